#!/usr/bin/env bash
# Side-by-side benchmark of ScsiGate and qemu-storage-daemon (QEMU 11.1, sid chroot) with the same
# busy-polling vhost-user client (Benchmarks/vhost-bench), in the same run, 4 KiB random I/O:
#   qsd-blk   qemu-storage-daemon --export type=vhost-user-blk (iothread)
#   sg-blk    ScsiGate vhost-user-blk
#   sg-scsi   ScsiGate vhost-user-scsi, READ(10)/WRITE(10) (qsd exports no vhost-user-scsi)
# on three back-ends: null (null-co), direct (O_DIRECT file; qsd aio=io_uring) and cached (page-cache
# file; qsd aio=threads), each a fully written 256 MiB file of its own. For every cell (back-end, op,
# queue depth) the three targets run interleaved, REPEATS times; the table shows medians and the
# ratios sg-blk/qsd-blk and sg-scsi/sg-blk.
#
# --dirty-log: the cost of dirty logging (live migration) instead: ScsiGate's blk and scsi targets with the
# client's logging off and on (-L: VHOST_F_LOG_ALL and a log whose bits the client checks), interleaved;
# no qsd. Columns: blk off, blk on, scsi off, scsi on, on/off ratios.
#
# Usage: vhost-bench.sh [-t SECONDS] [-r REPEATS] [--only null|direct|cached] [--qd "1 32"] [--ops "read write"]
#                       [--event-idx 0|1] [--dirty-log]
# Defaults: -t 3 -r 3, every back-end, QD 1 and 32, reads and writes, EVENT_IDX on. Needs root (chroot).
# SCSIGATE_BIN=PATH runs that scsigate binary instead of building this tree's release build.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/Deploy/lib.sh"
. "$ROOT/Benchmarks/bench-lib.sh"
sg_require_root
seconds=3 repeats=3 only="" qds="1 32" ops="read write" eidx=1 dirtylog=0
while [ $# -gt 0 ]; do
    case $1 in
        -t) seconds=$2; shift ;;
        -r) repeats=$2; shift ;;
        --only) only=$2; shift ;;
        --qd) qds=$2; shift ;;
        --ops) ops=$2; shift ;;
        --event-idx) eidx=$2; shift ;;
        --dirty-log) dirtylog=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) sg_die "unknown argument: $1" ;;
    esac
    shift
done
cd "$ROOT"
[ "$dirtylog" = 1 ] || bash Tests/RealClients/chroot/make-sid-chroot.sh >/dev/null || sg_die "sid chroot"
BIN=$(bench_binary) || exit 1
CLIENT=$(bash Benchmarks/vhost-bench/build.sh) || sg_die "cannot build the client"
W=$(sg_tempdir vbench)
QSD="" SG=""
cleanup() {
    [ -n "$QSD" ] && kill "$QSD" 2>/dev/null
    [ -n "$SG" ] && kill "$SG" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT
start() {  # start BACKEND: qsd and one gateway (a blk and a scsi controller) on that back-end
    local b=$1 qdev
    case $b in
        null) qdev="driver=null-co,node-name=b0,size=268435456" ;;
        direct) qdev="driver=file,node-name=b0,filename=$W/qsd.img,cache.direct=on,aio=io_uring" ;;
        cached) qdev="driver=file,node-name=b0,filename=$W/qsd.img,cache.direct=off,aio=threads" ;;
    esac
    rm -f "$W"/*.sock
    if [ "$dirtylog" = 0 ]; then
        bash Tests/RealClients/chroot/sid-run.sh --no-build --bind "$W" -- qemu-storage-daemon \
            --object iothread,id=io0 --blockdev "$qdev" \
            --export "type=vhost-user-blk,id=e0,node-name=b0,iothread=io0,addr.type=unix,addr.path=$W/qsd.sock,writable=on,num-queues=1" \
            >"$W/qsd.log" 2>&1 &
        QSD=$!
    fi
    { bench_gateway "$W"
      bench_controller blk vhost-user-blk "$W/blk.sock" "$(bench_lun "$b" "$W/blk.img")"
      bench_controller scsi vhost-user-scsi "$W/scsi.sock" "$(bench_lun "$b" "$W/scsi.img")"
    } >"$W/sg.toml"
    "$BIN" serve --config "$W/sg.toml" >"$W/sg.log" 2>&1 &
    SG=$!
    [ "$dirtylog" = 1 ] || bench_wait_socket "$W/qsd.sock" || { cat "$W/qsd.log" >&2; sg_die "qemu-storage-daemon did not start"; }
    bench_wait_socket "$W/blk.sock" && bench_wait_socket "$W/scsi.sock" || { cat "$W/sg.log" >&2; sg_die "scsigate did not start"; }
}
stop() {
    kill "$QSD" "$SG" 2>/dev/null
    wait "$QSD" "$SG" 2>/dev/null
    QSD="" SG=""
}

run() {  # run SOCK TYPE OP QD [CLIENT-ARGS...] -> IOPS (0 when the client failed)
    local w=(); [ "$3" = write ] && w=(-w)
    local out
    out=$("$CLIENT" -s "$1" -T "$2" "${w[@]}" -d "$4" -t "$seconds" -e "$eidx" "${@:5}" 2>&1) || out="$out (exit $?)"
    local iops; iops=$(printf '%s\n' "$out" | sed -n 's/^iops \([0-9]*\) .*errors 0$/\1/p')
    [ -n "$iops" ] || { printf 'client: %s\n' "$out" >&2; iops=0; }
    echo "$iops"
}
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

for f in blk scsi $([ "$dirtylog" = 1 ] || echo qsd); do
    dd if=/dev/urandom of="$W/$f.img" bs=1M count=256 status=none || sg_die "cannot write $W/$f.img"
done
sync
echo "load: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cpus; ${seconds}s per run, median of $repeats; EVENT_IDX $eidx"
if [ "$dirtylog" = 1 ]; then
    printf '%-7s %-5s %3s %10s %10s %10s %10s %7s %8s\n' backend op qd blk-off blk-log scsi-off scsi-log blk-l/o scsi-l/o
else
    printf '%-7s %-5s %3s %10s %10s %10s %8s %9s\n' backend op qd qsd-blk sg-blk sg-scsi sg/qsd scsi/blk
fi
for b in null direct cached; do
    [ -n "$only" ] && [ "$only" != "$b" ] && continue
    start "$b"
    for op in $ops; do
        for qd in $qds; do
            if [ "$dirtylog" = 1 ]; then
                bo=() bl=() so=() sl=()
                for _ in $(seq 1 "$repeats"); do
                    bo+=("$(run "$W/blk.sock" blk "$op" "$qd")")
                    bl+=("$(run "$W/blk.sock" blk "$op" "$qd" -L)")
                    so+=("$(run "$W/scsi.sock" scsi "$op" "$qd")")
                    sl+=("$(run "$W/scsi.sock" scsi "$op" "$qd" -L)")
                done
                m1=$(median "${bo[@]}") m2=$(median "${bl[@]}") m3=$(median "${so[@]}") m4=$(median "${sl[@]}")
                printf '%-7s %-5s %3s %10s %10s %10s %10s %7s %8s\n' "$b" "$op" "$qd" "$m1" "$m2" "$m3" "$m4" \
                    "$(ratio "$m2" "$m1")" "$(ratio "$m4" "$m3")"
                continue
            fi
            q=() g=() s=()
            for _ in $(seq 1 "$repeats"); do
                q+=("$(run "$W/qsd.sock" blk "$op" "$qd")")
                g+=("$(run "$W/blk.sock" blk "$op" "$qd")")
                s+=("$(run "$W/scsi.sock" scsi "$op" "$qd")")
            done
            mq=$(median "${q[@]}") mg=$(median "${g[@]}") ms=$(median "${s[@]}")
            printf '%-7s %-5s %3s %10s %10s %10s %8s %9s\n' "$b" "$op" "$qd" "$mq" "$mg" "$ms" \
                "$(ratio "$mg" "$mq")" "$(ratio "$ms" "$mg")"
        done
    done
    stop
done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
