#!/bin/bash
# Instructions per request of the gateway's Python hot path, counted by callgrind: unlike timings,
# the count does not move when the machine is busy. Runs bench/hotpath.py at two request counts and
# divides the difference, so start-up cost cancels out.
#   bench/instructions.sh [extra hotpath.py args...]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-$here/../.venv/bin/python}
count() {
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$py" "$here/hotpath.py" \
    --repeat 1 --warmup 200 --requests "$1" "${@:2}" 2>&1 | awk '/Collected/ {print $4}'
}
a=$(count 2000 "$@"); b=$(count 12000 "$@")
echo "hot path: $(( (b - a) / 10000 )) instructions/request"
