#!/usr/bin/env bash
# Per-request cost of ScsiGate's data path: system calls and CPU time per request of the whole gateway
# process while the busy-polling client (Benchmarks/vhost-bench) drives one queue, counted with
# `perf stat -e raw_syscalls:sys_enter,task-clock -p PID` (this VM has no PMU for instruction counts:
# use valgrind --tool=callgrind on a binary stripped with objcopy --strip-debug for those).
# Both include the loop's idle polling between requests.
# The gateway serves a null LUN on a vhost-user-blk and a vhost-user-scsi controller.
#
# Usage: per-request.sh [-t SECONDS] [-d DEPTH] [--backend null|direct|cached] [-w]
# Defaults: -t 3 -d 1, null, reads. SCSIGATE_BIN=PATH measures that binary (default: this tree's
# release build). Needs root (perf).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/Deploy/guest/lib.sh"
. "$ROOT/Deploy/bench/lib.sh"
sg_require_root
seconds=3 depth=1 backend=null write=()
while [ $# -gt 0 ]; do
    case $1 in
        -t) seconds=$2; shift ;;
        -d) depth=$2; shift ;;
        --backend) backend=$2; shift ;;
        -w) write=(-w) ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) sg_die "unknown argument: $1" ;;
    esac
    shift
done
cd "$ROOT"
BIN=$(bench_binary) || exit 1
CLIENT=$(bash Benchmarks/vhost-bench/build.sh) || sg_die "cannot build the client"
W=$(mktemp -d /var/tmp/scsigate-perreq.XXXXXX)
SG=""
trap '[ -n "$SG" ] && kill "$SG" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
lun=$(bench_lun "$backend" "$W/disk.img") || exit 1
[ "$backend" = null ] || dd if=/dev/urandom of="$W/disk.img" bs=1M count=256 status=none
{ bench_gateway "$W"
  bench_controller blk vhost-user-blk "$W/blk.sock" "$lun"
  # virtio-scsi on the same back-end (null only: a file is locked by its one LUN)
  [ "$backend" = null ] && bench_controller scsi vhost-user-scsi "$W/scsi.sock" "$lun"
} >"$W/sg.toml"
"$BIN" serve --config "$W/sg.toml" >"$W/sg.log" 2>&1 &
SG=$!
bench_wait_socket "$W/blk.sock" || { cat "$W/sg.log" >&2; sg_die "scsigate did not start"; }
echo "load: $(cut -d' ' -f1-3 /proc/loadavg); $backend, QD $depth, ${seconds}s"
types=(blk); [ "$backend" = null ] && types+=(scsi)
for type in "${types[@]}"; do
    perf stat -x, -e raw_syscalls:sys_enter,task-clock -p "$SG" -o "$W/perf.txt" -- \
        "$CLIENT" -s "$W/$type.sock" -T "$type" "${write[@]}" -d "$depth" -t "$seconds" >"$W/client.txt"
    total=$(sed -n 's/.* total \([0-9]*\) .*/\1/p' "$W/client.txt")
    [ -n "$total" ] && [ "$total" -gt 0 ] || { cat "$W/client.txt" >&2; sg_die "client failed"; }
    count() { awk -F, -v e="$1" '$3 ~ e { print $1 }' "$W/perf.txt"; }
    awk -v t="$total" -v s="$(count raw_syscalls)" -v c="$(count task-clock)" \
        -v ty="$type" -v line="$(cat "$W/client.txt")" \
        'BEGIN { printf "%-4s %s | syscalls/req %.2f  gateway CPU/req %.2f us\n", ty, line, s / t, c * 1000 / t }'
done
