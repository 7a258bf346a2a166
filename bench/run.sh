#!/usr/bin/env bash
# Tollway beside reference proxies, measured side by side in one run on one machine.
#
# One fast backend (nginx, one worker, 127.0.0.1:9001) answers 200 with a small JSON body on every
# path. Each proxy under test runs ONE worker pinned to CPU 1; wrk and the backend share CPU 0. Per
# target it prints requests/s, the proxy's own CPU time per request (user+sys of its process tree
# divided by requests served: the figure to compare, since throughput saturates near the backend's
# limit on two cores) and wrk's p50/p99. Compare ratios within one run: absolutes move with load.
#
#   bench/setup.sh                                      # once
#   bench/run.sh [seconds] [connections] [targets...]   # default: 8 64 nginx haproxy caddy aiohttp tollway
#
# Targets:
#   direct       the backend itself
#   nginx haproxy caddy aiohttp   reference proxies (bench/reference/), one worker each
#   nginx-chain  nginx doing a gateway's common chain (bench/reference/nginx-chain.sh)
#   tollway      `tollway run -c $TOLLWAY_CONFIG --workers 1` (default bench/passthrough.yaml), port 8000
#   gateway      any command: GW_CMD (runs in the foreground, one worker, forwarding to 127.0.0.1:9001)
#                listening on GW_PORT (default 8000); bench/bench.py uses this one
# Environment: BENCH_PATH (request path, default /user/1), BENCH_HEADER (one extra request header,
# e.g. 'apikey: key-42'), TOLLWAY (the tollway command; default: the repository's .venv/bin/tollway).
set -u
here=$(cd "$(dirname "$0")" && pwd)
ref=$here/reference
secs=${1:-8}; conns=${2:-64}; shift 2 2>/dev/null || true
targets=${*:-nginx haproxy caddy aiohttp tollway}
work=${BENCH_TMP:-/tmp/tollway-bench}
venv=${BENCH_VENV:-$work/venv}
tollway=${TOLLWAY:-$here/../.venv/bin/tollway}
path=${BENCH_PATH:-/user/1}
hdr=${BENCH_HEADER:-}
mkdir -p "$work"
for tool in nginx wrk taskset curl; do
  command -v "$tool" >/dev/null || { echo "bench/run.sh needs $tool: run bench/setup.sh first" >&2; exit 1; }
done

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
cputicks() {  # utime+stime of a process and its descendants (two levels), in clock ticks
  local root=$1 sum=0 q
  [ -z "$root" ] && { echo 0; return; }
  for q in $root $(pgrep -P "$root") $(for c in $(pgrep -P "$root"); do pgrep -P "$c"; done); do
    [ -r "/proc/$q/stat" ] && sum=$((sum + $(awk '{print $14+$15}' "/proc/$q/stat")))
  done
  echo $sum
}
curl_args=(-s -o /dev/null -w '%{http_code}')
[ -n "$hdr" ] && curl_args+=(-H "$hdr")
start() {  # name port cmd...: starts a proxy on CPU 1, waits until it answers, prints its pid
  local name=$1 port=$2; shift 2
  taskset -c 1 "$@" >"$work/$name.log" 2>&1 &
  local p=$!
  for _ in $(seq 150); do
    curl "${curl_args[@]}" "http://127.0.0.1:$port$path" | grep -qv 000 && break
    sleep 0.2
  done
  echo $p
}
nginx_conf() {  # a reference nginx config with its work directory filled in
  sed "s|@WORK@|$work|g" "$ref/$1" >"$work/$1"
  echo "$work/$1"
}

taskset -c 0 nginx -c "$(nginx_conf backend-nginx.conf)" -p "$work" &
pids+=($!)
sleep 0.5
for t in $targets; do
  p=
  case $t in
    direct) port=9001 ;;
    nginx) port=9100; p=$(start nginx 9100 nginx -c "$(nginx_conf nginx.conf)" -p "$work") ;;
    haproxy) port=9101; p=$(start haproxy 9101 haproxy -f "$ref/haproxy.cfg") ;;
    caddy) port=9102; p=$(GOMAXPROCS=1 start caddy 9102 caddy run --config "$ref/Caddyfile" --adapter caddyfile) ;;
    aiohttp) port=9103; p=$(start aiohttp 9103 "$venv/bin/python" "$ref/aiohttp_proxy.py" 9103) ;;
    nginx-chain) port=9106; BENCH_TMP=$work "$ref/nginx-chain.sh" >/dev/null
                 p=$(start nginx-chain 9106 nginx -c "$work/nginx-chain.conf" -p "$work") ;;
    tollway) port=8000; config=${TOLLWAY_CONFIG:-$here/passthrough.yaml}
             p=$(start tollway 8000 "$tollway" run -c "$config" --workers 1) ;;
    gateway) port=${GW_PORT:-8000}; p=$(start gateway "$port" bash -c "exec ${GW_CMD:?set GW_CMD}") ;;
    *) echo "unknown target $t"; continue ;;
  esac
  ok=$(curl "${curl_args[@]}" "http://127.0.0.1:$port$path")
  wrk_args=(-t1 -c"$conns" -d"${secs}s" --latency)
  [ -n "$hdr" ] && wrk_args+=(-H "$hdr")
  c0=$(cputicks "$p")
  out=$(taskset -c 0 wrk "${wrk_args[@]}" "http://127.0.0.1:$port$path" 2>&1)
  c1=$(cputicks "$p")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  cpu_us=$(awk -v a="$c0" -v b="$c1" -v n="$reqs" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { if (n > 0 && b > a) printf "%.1f", (b - a) / hz * 1e6 / n; else print "-" }')
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out"); p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  errs=$(grep -E "Non-2xx|Socket errors" <<<"$out" | tr '\n' ' ')
  printf '%-11s status=%s rps=%-10s cpu_us/req=%-6s p50=%-8s p99=%-8s %s\n' \
    "$t" "$ok" "$rps" "$cpu_us" "$p50" "$p99" "$errs"
  [ -n "$p" ] && { kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; }
  sleep 0.5
done
