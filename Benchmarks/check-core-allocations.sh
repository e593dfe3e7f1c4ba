#!/bin/sh
# Shows that READ(10)/WRITE(10) through execute/resume do not allocate: the heap totals valgrind reports
# for a short and a long core-bench run must be equal (every allocation happens in setup).
set -eu
cd "$(dirname "$0")/.."
swift build -c release --product core-bench >/dev/null
bench=.build/release/core-bench
allocs() { valgrind --tool=memcheck --leak-check=no "$bench" "$1" 1 2>&1 | sed -n 's/.*total heap usage: \([0-9,]*\) allocs.*/\1/p'; }
short=$(allocs 1000)
long=$(allocs 21000)
echo "heap allocations: 2,000 commands: $short; 42,000 commands: $long"
if [ "$short" = "$long" ]; then echo "OK: no per-command allocation"; else echo "FAIL: allocations grow with commands"; exit 1; fi
