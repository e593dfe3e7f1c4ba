#!/usr/bin/env bash
# Side-by-side benchmark: ScsiGate's vhost-user-blk export against qemu-storage-daemon's, both driven
# by `qemu-img bench --image-opts driver=virtio-blk-vhost-user` (libblkio, from the Debian sid chroot)
# in the same run, on the same back-ends:
#   null          (ScsiGate backend = "null"   vs  qemu-storage-daemon driver=null-co)
#   file-direct   (file, cache = "none"        vs  driver=file, cache.direct=on, aio=native)
#   file-cached   (file, cache = "writeback"   vs  driver=file, cache.direct=off, aio=threads)
# For each: reads, then writes (-w); prints IOPS and the ScsiGate / qemu-storage-daemon ratio.
#
# Usage: vhost-blk-bench.sh [-c COUNT] [-d DEPTH] [-s SIZE] [--release|--debug] [--only NAME]
# Defaults: -c 200000 -d 32 -s 4096, release build. Needs root (chroot).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/Deploy/guest/lib.sh"
sg_require_root
count=200000 depth=32 size=4096 config=release only=""
while [ $# -gt 0 ]; do
    case $1 in
        -c) count=$2; shift ;;
        -d) depth=$2; shift ;;
        -s) size=$2; shift ;;
        --release) config=release ;;
        --debug) config=debug ;;
        --only) only=$2; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) sg_die "unknown argument: $1" ;;
    esac
    shift
done
cd "$ROOT"
bash Deploy/chroot/make-sid-chroot.sh >&2 || sg_die "sid chroot"
swift build -c "$config" --product scsigate >&2 || sg_die "swift build -c $config failed"
BIN="$(swift build -c "$config" --show-bin-path)/scsigate"
W=$(mktemp -d /var/tmp/scsigate-bench.XXXXXX)
PEER=""
cleanup() { [ -n "$PEER" ] && kill "$PEER" 2>/dev/null; pkill -f "serve --config $W/" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
SID() { bash Deploy/chroot/sid-run.sh --no-build --bind "$W" -- "$@"; }

wait_socket() { for _ in $(seq 1 100); do [ -S "$1" ] && return 0; sleep 0.1; done; return 1; }

# bench SOCK [-w] -> IOPS on stdout
bench() {
    local sock=$1; shift
    local out secs
    out=$(SID qemu-img bench --image-opts "driver=virtio-blk-vhost-user,path=$sock,cache.direct=on" \
        -c "$count" -d "$depth" -s "$size" "$@" 2>&1)
    secs=$(printf '%s\n' "$out" | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p')
    [ -n "$secs" ] || { printf '%s\n' "$out" >&2; echo 0; return 1; }
    awk -v c="$count" -v s="$secs" 'BEGIN { printf "%.0f\n", c / s }'
}

start_qsd() {  # start_qsd BLOCKDEV-ARGS...
    rm -f "$W/qsd.sock"
    SID qemu-storage-daemon --blockdev "$1" \
        --export "type=vhost-user-blk,id=e0,node-name=b0,addr.type=unix,addr.path=$W/qsd.sock,writable=on,num-queues=1" \
        >"$W/qsd.log" 2>&1 &
    PEER=$!
    wait_socket "$W/qsd.sock" || { cat "$W/qsd.log" >&2; sg_die "qemu-storage-daemon did not start"; }
}
stop_qsd() { pkill -f "addr.path=$W/qsd.sock" 2>/dev/null; wait "$PEER" 2>/dev/null; PEER=""; }

start_scsigate() {  # start_scsigate BACKEND-TOML-LINES
    rm -f "$W/sg.sock"
    cat >"$W/sg.toml" <<TOML
[gateway]
state_dir = "$W/state"
control_socket = "$W/control.sock"
log_level = "warning"

[[controller]]
name = "bench"
transport = "vhost-user-blk"
socket = "$W/sg.sock"
queues = 1
queue_size = 256

[[controller.lun]]
lun = 0
$1
TOML
    "$BIN" serve --config "$W/sg.toml" >"$W/sg.log" 2>&1 &
    wait_socket "$W/sg.sock" || { cat "$W/sg.log" >&2; sg_die "scsigate did not start"; }
}
stop_scsigate() { pkill -TERM -f "serve --config $W/sg.toml"; sleep 0.5; }

printf '%-12s %-6s %12s %12s %7s\n' backend op scsigate qsd ratio
row() {  # row NAME QSD-BLOCKDEV SCSIGATE-LUN
    local name=$1 qsd_dev=$2 sg_lun=$3 op sg q
    [ -n "$only" ] && [ "$only" != "$name" ] && return
    for op in read write; do
        local flag=(); [ $op = write ] && flag=(-w)
        start_qsd "$qsd_dev"; q=$(bench "$W/qsd.sock" "${flag[@]}"); stop_qsd
        start_scsigate "$sg_lun"; sg=$(bench "$W/sg.sock" "${flag[@]}"); stop_scsigate
        printf '%-12s %-6s %12s %12s %7s\n' "$name" "$op" "$sg" "$q" \
            "$(awk -v a="$sg" -v b="$q" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
    done
}
# A fully written file, so that both sides read real data and overwrite allocated blocks (a sparse
# file would favour whichever side runs second, after the first allocated the blocks).
dd if=/dev/zero of="$W/disk.img" bs=1M count=1024 oflag=direct status=none || sg_die "cannot write $W/disk.img"
sync
row null "driver=null-co,node-name=b0,size=1073741824" 'backend = "null"
size = "1G"'
row file-direct "driver=file,node-name=b0,filename=$W/disk.img,cache.direct=on,aio=native" "backend = \"file\"
path = \"$W/disk.img\"
cache = \"none\""
row file-cached "driver=file,node-name=b0,filename=$W/disk.img,cache.direct=off,aio=threads" "backend = \"file\"
path = \"$W/disk.img\"
cache = \"writeback\""
