#!/usr/bin/env bash
# What a newcomer does in the first hour, on a fresh clone, timed against the bar:
#   1. the README's demo command: clone -> demo answering in <= 120 s;
#   2. SIGTERM to the demo leaves no process of it behind;
#   3. `tollway check` on a file with five different mistakes prints all five, in line order;
#   4. the README's test command installs in <= 30 s (it reuses the demo's build); with --tests it also
#      runs the tests: <= 10 minutes in all (the whole suite: not on a machine others are using).
#
#   scripts/newcomer.sh [--tests] [--keep] [REPOSITORY]     (default: this repository's committed HEAD)
#
# The clone gets its own build cache (TOLLWAY_BUILD_CACHE), so nothing built earlier on this machine
# is reused: the figures are a first install's. Wall-clock times move with machine load, so the load
# average and the CPU time (user+sys) of each step are printed beside them.
set -uo pipefail

run_tests=0 keep=0 repo=""
for arg in "$@"; do
  case $arg in
    --tests) run_tests=1 ;;
    --keep) keep=1 ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) repo=$arg ;;
  esac
done
repo=${repo:-$(cd "$(dirname "$0")/.." && pwd)}
work=$(mktemp -d "${TMPDIR:-/tmp}/tollway-newcomer-XXXXXX")
clone=$work/tollway
failures=0
demo_pid=""

cleanup() {
  if [ -n "$demo_pid" ] && kill -0 "$demo_pid" 2>/dev/null; then kill -TERM "$demo_pid"; wait "$demo_pid"; fi
  if [ "$keep" = 1 ]; then echo "kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }
verdict() {  # verdict NAME OK(0/1) DETAIL
  if [ "$2" = 0 ]; then echo "PASS  $1: $3"; else echo "FAIL  $1: $3"; failures=$((failures + 1)); fi
}
load() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime; }
cpu_seconds() {  # user+sys of this shell's finished children so far, in seconds (into $cpu)
  times >"$work/times"  # not in a $(subshell): that would count the subshell's children only
  cpu=$(tail -1 "$work/times" | awk '{ split($1, u, "m"); split($2, s, "m"); print u[1] * 60 + u[2] + s[1] * 60 + s[2] }')
}
readme_command() {  # the command in README.md's ```sh block that contains $1
  awk -v want="$1" '/^```sh/ {f = 1; next} /^```/ {f = 0} f && index($0, want) {print; exit}' "$clone/README.md"
}
descendants() {  # every process below $1, from /proc
  local all; all=$(ps -e -o pid=,ppid=)
  local front=$1 found=""
  while [ -n "$front" ]; do
    local next=""
    for p in $front; do next="$next $(awk -v p="$p" '$2 == p {print $1}' <<<"$all")"; done
    front=$(echo $next)
    found="$found $front"
  done
  echo $found
}

say "machine: $(nproc) cores, load average $(load)"
start=$(date +%s.%N)
git clone --quiet "$repo" "$clone" || { echo "cannot clone $repo"; exit 1; }
cd "$clone"
export TOLLWAY_BUILD_CACHE=$work/build-cache

# -- 1. the demo ------------------------------------------------------------------------------------
demo_cmd=$(readme_command "tollway demo")
say "README: $demo_cmd"
[ -n "$demo_cmd" ] || { echo "README.md has no demo command"; exit 1; }
cpu_seconds
cpu_before=$cpu
# exec: the demo takes the shell's pid, so it can be signalled like a user's Ctrl-C would reach it
bash -c "${demo_cmd% && .venv/bin/tollway demo*} && exec .venv/bin/tollway demo --port 0" \
  >"$work/demo.out" 2>&1 &
demo_pid=$!
answered=""
while kill -0 "$demo_pid" 2>/dev/null; do
  if grep -q "Press Ctrl-C" "$work/demo.out"; then answered=$(date +%s.%N); break; fi
  sleep 0.5
done
if [ -z "$answered" ]; then
  cat "$work/demo.out"
  verdict "demo answering" 1 "the demo exited before answering"
  exit 1
fi
demo_seconds=$(echo "$answered - $start" | bc)
grep -E "Round-robin spread|Rate limit:|gateway pid|access log" "$work/demo.out" | sed 's/^/  /'
verdict "clone -> demo answering" "$([ "$(echo "$demo_seconds <= 120" | bc)" = 1 ] && echo 0 || echo 1)" \
  "$(printf '%.0f' "$demo_seconds") s (bar 120 s), load average now $(load)"

# -- 2. SIGTERM leaves nothing ------------------------------------------------------------------------
procs=$(descendants "$demo_pid")
say "SIGTERM to the demo (pid $demo_pid; below it: $procs)"
kill -TERM "$demo_pid"
wait "$demo_pid"
demo_status=$?
demo_pid=""
cpu_seconds
cpu_after=$cpu
left=""
for _ in $(seq 40); do
  left=""
  for p in $procs; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
  [ -z "$left" ] && break
  sleep 0.5
done
verdict "SIGTERM stops everything" "$([ -z "$left" ] && [ "$demo_status" = 0 ] && echo 0 || echo 1)" \
  "exit status $demo_status, $(echo $procs | wc -w) processes started, left running:${left:- none}"
echo "  CPU time (user+sys) of install and demo: $(echo "$cpu_after - $cpu_before" | bc) s"

# -- 3. check reports five mistakes in line order -------------------------------------------------------
cat >"$work/five-mistakes.yaml" <<'EOF'
gateway:
  listen: ["127.0.0.1:8000"]
  wokers: 2
services:
  - name: users
    url: http://127.0.0.1:8001
routes:
  - name: users
    service: user
    paths: ["/users"]
    plugins:
      - name: rate-limting
        config: {minute: 5}
  - name: orders
    service: users
    paths: ["orders"]
    plugins:
      - name: rate-limiting
        config: {minute: five}
EOF
say "tollway check five-mistakes.yaml"
.venv/bin/tollway check "$work/five-mistakes.yaml" 2>&1 | tee "$work/check.out"
lines=$(grep -oE 'five-mistakes.yaml:[0-9]+' "$work/check.out" | cut -d: -f2 | tr '\n' ' ')
verdict "check prints all five in line order" "$([ "$lines" = "3 9 12 16 19 " ] && echo 0 || echo 1)" \
  "lines ${lines:-none}(expected 3 9 12 16 19)"

# -- 4. the test command ---------------------------------------------------------------------------------
test_cmd=$(awk '/<!-- test-command/ {armed=1; next} armed && /^```/ {if (fence) exit; fence=1; next}
                fence {print; exit}' README.md)
install_part=${test_cmd% && .venv/bin/pytest*}
say "README: $test_cmd"
t0=$(date +%s.%N)
bash -c "$install_part" >"$work/test-install.out" 2>&1
install_status=$?
t1=$(date +%s.%N)
grep -E "^Successfully|ERROR" "$work/test-install.out" | cut -c1-160 | sed 's/^/  /'
install_s=$(echo "$t1 - $t0" | bc)
verdict "test command installs in <= 30 s" \
  "$([ "$(echo "$install_s <= 30" | bc)" = 1 ] && [ "$install_status" = 0 ] && echo 0 || echo 1)" \
  "$(printf '%.0f' "$install_s") s, exit status $install_status, load average now $(load)"
if [ "$run_tests" = 1 ]; then
  bash -c "${test_cmd#"$install_part" && }" 2>&1 | tail -5
  tests_status=${PIPESTATUS[0]}
  t2=$(date +%s.%N)
  total_s=$(echo "$t2 - $t0" | bc)
  verdict "test command <= 10 minutes" \
    "$([ "$(echo "$total_s <= 600" | bc)" = 1 ] && [ "$tests_status" = 0 ] && echo 0 || echo 1)" \
    "$(printf '%.0f' "$total_s") s, pytest exit status $tests_status, load average now $(load)"
fi

say "$([ $failures = 0 ] && echo "all passed" || echo "$failures failed")"
exit $((failures > 0))
