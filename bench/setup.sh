#!/usr/bin/env bash
# Installs what bench/run.sh needs, once: the reference proxies and the load generator (Debian
# packages: nginx, haproxy, caddy, wrk), and a venv with the hand-written aiohttp proxy's libraries.
# Idempotent. Tollway itself is whatever `tollway` the repository's .venv (or $TOLLWAY) runs.
set -eu
need=()
for pair in nginx:nginx-light haproxy:haproxy caddy:caddy wrk:wrk taskset:util-linux; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
work=${BENCH_TMP:-/tmp/tollway-bench}
venv=${BENCH_VENV:-$work/venv}
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$work"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q aiohttp uvloop
fi
echo "bench ready: nginx haproxy caddy wrk; aiohttp venv $venv"
