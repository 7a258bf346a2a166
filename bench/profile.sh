#!/bin/bash
# Where a loaded proxy's CPU goes, Tollway and nginx side by side (docs/development.md, "Profiling a
# loaded worker"). For each target: the harness's nginx backend on CPU 0, the proxy (one worker) on
# CPU 1, wrk on CPU 0 for SECONDS; meanwhile `perf record` samples the proxy's processes (cpu-clock:
# a software event, so it works in VMs without a PMU), `perf stat` counts, and `strace -c` (on a second,
# shorter load, since tracing slows the process) counts system calls. Prints, per request: CPU µs split
# by shared object (kernel, libpython, Tollway's compiled modules, uvloop, httptools, ...), the top
# symbols, system calls, and the hardware counters when the machine has them.
#   bench/profile.sh [seconds] [connections] [targets: tollway nginx tollway-cache nginx-cache]
# Needs: perf, strace, wrk, nginx (the harness's setup.sh). 127.0.0.1 only.
set -u
here=$(cd "$(dirname "$0")" && pwd)
secs=${1:-6}; conns=${2:-64}; shift 2 2>/dev/null || true
targets=${*:-tollway nginx}
py=${PYTHON:-$here/../.venv/bin/python}
# nginx configs (backend, proxy, proxy cache) of the harness bench/bench.py drives for the cache scenario
ref=$(dirname "${TOLLWAY_BENCH_HARNESS:?set TOLLWAY_BENCH_HARNESS to the harness run.sh, as for bench/bench.py}")
out=/tmp/gwbench/profile; mkdir -p "$out"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
taskset -c 0 nginx -c "$ref/backend-nginx.conf" -p /tmp/gwbench & pids+=($!)
sleep 0.5
for t in $targets; do
  path=/user/1
  case $t in
    tollway) cmd=("$py" -m tollway run -c "$here/passthrough.yaml" --workers 1); port=8000 ;;
    tollway-cache) rm -rf /tmp/gwbench/tollway-cache-node
      cmd=("$py" -m tollway run -c "$here/cache-node.yaml" --workers 1); port=8000; path=/cached/user/1 ;;
    nginx) cmd=(nginx -c "$ref/proxy-nginx.conf" -p /tmp/gwbench); port=9100 ;;
    nginx-cache) rm -rf /tmp/gwbench/nginx-cache
      cmd=(nginx -c "$ref/proxy-nginx-cache.conf" -p /tmp/gwbench); port=9107; path=/cached/user/1 ;;
    *) echo "unknown target $t"; continue ;;
  esac
  url=http://127.0.0.1:$port$path
  taskset -c 1 "${cmd[@]}" >"$out/$t.log" 2>&1 & root=$!
  for _ in $(seq 100); do curl -s -o /dev/null "$url" && break; sleep 0.2; done
  sleep 0.5
  procs=$(echo $root $(pgrep -P $root) | tr ' ' ',')
  # wrk runs longer than the recording on both sides, so only steady load is sampled.
  taskset -c 0 wrk -t1 -c"$conns" -d"$((secs + 2))s" "$url" >"$out/$t.wrk" 2>&1 & wrk=$!
  sleep 1
  perf record -q -e cpu-clock -F 4000 -g -p "$procs" -o "$out/$t.data" -- sleep "$secs" 2>/dev/null
  wait $wrk
  reqs=$(awk '/requests in/ {print $1}' "$out/$t.wrk")
  rps=$(awk '/Requests\/sec/ {print $2}' "$out/$t.wrk")
  # requests served while perf recorded: rps × seconds (wrk's rate is steady after the first second)
  recorded=$(awk -v r="$rps" -v s="$secs" 'BEGIN {printf "%d", r * s}')
  echo "== $t: $reqs requests, $rps req/s"
  # samples per shared object (-n: exact counts), 4,000 a second: 250 µs of CPU each
  perf report -i "$out/$t.data" --stdio --no-children --sort dso -n -g none 2>/dev/null |
    awk '/^ +[0-9.]+%/ {print $2, $3}' >"$out/$t.dso"
  awk -v n="$recorded" '{total += $1} END {if (n > 0) printf "  CPU per request while recorded: %.2f µs (%d samples)\n", total * 250 / n, total}' "$out/$t.dso"
  echo "  by shared object (µs per request, share):"
  awk -v n="$recorded" 'NR == FNR {total += $1; next} {printf "    %-52s %6.2f µs  %5.1f%%\n", $2, $1 * 250 / n, 100 * $1 / total}' \
    "$out/$t.dso" "$out/$t.dso" | head -10
  echo "  top symbols:"
  perf report -i "$out/$t.data" --stdio --no-children --sort dso,sym -g none 2>/dev/null |
    awk '/^ +[0-9.]+%/ {print "   ", $0}' | cut -c1-130 | head -20
  # System calls per request, on a second load (strace slows the process: its CPU is not measured).
  taskset -c 0 wrk -t1 -c"$conns" -d3s "$url" >/dev/null 2>&1 & wrk=$!
  sleep 0.5
  timeout 2 strace -c -f -p "$procs" -o "$out/$t.strace" 2>/dev/null
  wait $wrk
  echo "  system calls (2 s under strace; calls column):"
  awk '/^ *[0-9]/ && $NF != "total" {printf "    %-16s %s\n", $NF, $4}' "$out/$t.strace" | sort -k2 -nr | head -8
  # Hardware counters where the machine has a PMU (not in most VMs: then "<not supported>").
  taskset -c 0 wrk -t1 -c"$conns" -d3s "$url" >/dev/null 2>&1 & wrk=$!
  sleep 0.5
  perf stat -e task-clock,context-switches,page-faults,cycles,instructions,cache-misses,branch-misses \
    -p "$procs" -- sleep 2 2>&1 | awk '/task-clock|context-switches|page-faults|cycles|instructions|misses/ {print "   ", $0}'
  wait $wrk
  kill $root 2>/dev/null; wait $root 2>/dev/null
  sleep 0.5
done
