#!/usr/bin/env bash
# Per-request cost of ScsiGate's data path: system calls and CPU time per request of the whole gateway
# process while the busy-polling client (Benchmarks/vhost-bench) drives one queue, counted with
# `perf stat -e raw_syscalls:sys_enter,task-clock -p PID`. Both include the loop's idle polling between
# requests.
# --instructions: instructions per request instead. This VM has no PMU (`perf stat -e instructions` says
# "not supported"), so the gateway runs under valgrind --tool=callgrind with instrumentation off, switched
# on for the client's run; once the client runs (connection set up, warm-up started) the counts are zeroed and the
# client marks its request count (SIGUSR1): the exact count of instructions the gateway executed from then
# on (every thread, idle polling included) divided by the requests the client completed from then on. The
# gateway runs about 50x slower there, so the client always finds it busy: the figure is the cost of a
# request, not of waiting for one. Robust on a loaded machine (IOPS are not).
# --dirty-log: the client runs with -L (VHOST_F_LOG_ALL, a dirty log; it checks the log's bits).
# The gateway serves a null LUN on a vhost-user-blk and a vhost-user-scsi controller.
#
# Usage: per-request.sh [-t SECONDS] [-d DEPTH] [--backend null|direct|cached] [-w] [--instructions]
#                       [--dirty-log] [--types "blk scsi"]
# Defaults: -t 3 -d 1, null, reads, both types. SCSIGATE_BIN=PATH measures that binary (default: this
# tree's release build). Needs root (perf).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/Deploy/lib.sh"
. "$ROOT/Benchmarks/bench-lib.sh"
sg_require_root
seconds=3 depth=1 backend=null write=() instructions=0 log=() only_types=
while [ $# -gt 0 ]; do
    case $1 in
        -t) seconds=$2; shift ;;
        -d) depth=$2; shift ;;
        --backend) backend=$2; shift ;;
        -w) write=(-w) ;;
        --instructions) instructions=1 ;;
        --dirty-log) log=(-L) ;;
        --types) only_types=$2; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) sg_die "unknown argument: $1" ;;
    esac
    shift
done
cd "$ROOT"
BIN=$(bench_binary) || exit 1
CLIENT=$(bash Benchmarks/vhost-bench/build.sh) || sg_die "cannot build the client"
W=$(sg_tempdir perreq)
SG=""
trap '[ -n "$SG" ] && kill "$SG" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
lun=$(bench_lun "$backend" "$W/disk.img") || exit 1
[ "$backend" = null ] || dd if=/dev/urandom of="$W/disk.img" bs=1M count=256 status=none
{ bench_gateway "$W"
  bench_controller blk vhost-user-blk "$W/blk.sock" "$lun"
  # virtio-scsi on the same back-end (null only: a file is locked by its one LUN)
  [ "$backend" = null ] && bench_controller scsi vhost-user-scsi "$W/scsi.sock" "$lun"
} >"$W/sg.toml"
if [ "$instructions" = 1 ]; then
    # valgrind 3.19 gives up on the Swift binary's DWARF ("Possibly corrupted debuginfo file"): symbols only.
    objcopy --strip-debug "$BIN" "$W/scsigate" || sg_die "objcopy --strip-debug $BIN"
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$W/cg.%p" \
        "$W/scsigate" serve --config "$W/sg.toml" >"$W/sg.log" 2>&1 &
else
    "$BIN" serve --config "$W/sg.toml" >"$W/sg.log" 2>&1 &
fi
SG=$!
for _ in 1 2 3 4 5 6; do kill -0 "$SG" 2>/dev/null && ! bench_wait_socket "$W/blk.sock" || break; done  # valgrind starts slowly
[ -S "$W/blk.sock" ] || { cat "$W/sg.log" >&2; sg_die "scsigate did not start"; }
echo "load: $(cut -d' ' -f1-3 /proc/loadavg); $backend, QD $depth, ${seconds}s${log:+, dirty log on}"
types=(blk); [ "$backend" = null ] && types+=(scsi)
[ -n "$only_types" ] && read -ra types <<<"$only_types"
for type in "${types[@]}"; do
    client=("$CLIENT" -s "$W/$type.sock" -T "$type" "${write[@]}" "${log[@]}" -d "$depth" -t "$seconds")
    if [ "$instructions" = 1 ]; then
        rm -f "$W"/cg.*.*
        callgrind_control -i on "$SG" >/dev/null || sg_die "callgrind_control"
        "${client[@]}" >"$W/client.txt" & cpid=$!
        # Past the connection's set-up (rings, slot tables) and into the client's warm-up: zero the counts and
        # mark the client's request count at the same moment (SIGUSR1: it prints "since-mark N").
        sg_wait 30 grep -q '^running' "$W/client.txt"
        sleep 0.2
        callgrind_control -z "$SG" >/dev/null && kill -USR1 "$cpid" || sg_die "callgrind_control"
        wait "$cpid"; rc=$?
        callgrind_control -d "$SG" >/dev/null && callgrind_control -i off "$SG" >/dev/null || sg_die "callgrind_control"
        ir=$(sed -n 's/^summary: \([0-9]*\).*/\1/p' "$W"/cg.*.* 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
    else
        perf stat -x, -e raw_syscalls:sys_enter,task-clock -p "$SG" -o "$W/perf.txt" -- "${client[@]}" >"$W/client.txt"; rc=$?
    fi
    total=$(sed -n 's/.* total \([0-9]*\) .*/\1/p' "$W/client.txt")
    [ "$rc" = 0 ] && [ -n "$total" ] && [ "$total" -gt 0 ] || { cat "$W/client.txt" >&2; sg_die "client failed"; }
    line=$(tr '\n' ' ' <"$W/client.txt")
    if [ "$instructions" = 1 ]; then
        total=$(sed -n 's/.* since-mark \([0-9]*\).*/\1/p' "$W/client.txt")
        [ -n "$total" ] && [ "$total" -gt 0 ] || sg_die "client saw no request after the mark"
        awk -v t="$total" -v i="$ir" -v ty="$type" -v line="$line" \
            'BEGIN { printf "%-4s %s| instructions/req %.0f\n", ty, line, i / t }'
    else
        count() { awk -F, -v e="$1" '$3 ~ e { print $1 }' "$W/perf.txt"; }
        awk -v t="$total" -v s="$(count raw_syscalls)" -v c="$(count task-clock)" -v ty="$type" -v line="$line" \
            'BEGIN { printf "%-4s %s| syscalls/req %.2f  gateway CPU/req %.2f us\n", ty, line, s / t, c * 1000 / t }'
    fi
done
