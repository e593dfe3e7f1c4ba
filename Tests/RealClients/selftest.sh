#!/usr/bin/env bash
# Prove the harness itself against QEMU's built-in devices (no ScsiGate involved):
#  1. virtio-scsi + scsi-hd: smoke, discard, fio-verify, conformance, pattern (+ host byte check)
#  2. virtio-blk: smoke, discard, fio-verify, pattern (+ host byte check)
#  3. virtio-scsi hotplug: a scsi-hd added and removed from the QEMU monitor
#  4. (--pvscsi) pvscsi + scsi-hd: smoke, fio-verify, pattern
# Usage: selftest.sh [--sid] [--pvscsi] [--max-failed N] [--keep]
#   --sid           use the sid chroot's QEMU (11.x) instead of the host's
#   --max-failed N  conformance failures allowed for QEMU's scsi-hd (default 52, QEMU 7.2's count)
#   --keep          keep the disk image and logs in the work dir
# Exit 0 when every guest test passed and the byte checks matched.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../../Deploy/lib.sh"
sid=() maxf=52 keep=0 pv=0
while [ $# -gt 0 ]; do
    case $1 in
        --sid) sid=(--sid) ;;
        --pvscsi) pv=1 ;;
        --max-failed) maxf=$2; shift ;;
        --keep) keep=1 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) sg_die "unknown argument: $1" ;;
    esac
    shift
done
sg_require_root
work=$(sg_tempdir selftest)
[ $keep = 1 ] || trap 'rm -rf "$work"' EXIT
img=$work/disk.img
truncate -s 256M "$img"
pass=0 fail=0
result() { if [ "$2" = 0 ]; then pass=$((pass + 1)); echo "selftest: $1 OK"; else fail=$((fail + 1)); echo "selftest: $1 FAILED ($2)"; fi; }

"$HERE/run-guest.sh" "${sid[@]}" --quiet --test multi --log "$work/virtio-scsi.log" --timeout 900 \
    --append scsigate.tests=smoke,discard,fio-verify,conformance,pattern \
    -- -drive "file=$img,if=none,id=d0,format=raw,cache=none,aio=native,discard=unmap" \
    -device virtio-scsi-pci -device scsi-hd,drive=d0,serial=SELFTEST-SCSI
result "virtio-scsi guest tests" $?
"$HERE/check-pattern.sh" "$work/virtio-scsi.log" "$img"; result "virtio-scsi byte check" $?
"$HERE/summarize-cunit.sh" "$work/virtio-scsi.log" --max-failed "$maxf" | grep -v '^SKIPPED:'
result "virtio-scsi conformance (<= $maxf failed)" "${PIPESTATUS[0]}"

"$HERE/run-guest.sh" "${sid[@]}" --quiet --test multi --log "$work/virtio-blk.log" --timeout 600 \
    --append scsigate.tests=smoke,discard,fio-verify,pattern \
    -- -drive "file=$img,if=none,id=d0,format=raw,cache=none,aio=native,discard=unmap" \
    -device virtio-blk-pci,drive=d0,serial=SELFTEST-BLK
result "virtio-blk guest tests" $?
"$HERE/check-pattern.sh" "$work/virtio-blk.log" "$img"; result "virtio-blk byte check" $?

# hotplug through virtio-scsi events, driven from the QEMU monitor
port=$((20000 + $$ % 20000))
truncate -s 32M "$work/hot.img"
"$HERE/run-guest.sh" "${sid[@]}" --quiet --test hotplug --log "$work/hotplug.log" --timeout 300 \
    --append "scsigate.expect_serial=SELFTEST-HOT scsigate.hotplug_wait=90" \
    -- -monitor "tcp:127.0.0.1:$port,server,nowait" \
    -drive "file=$img,if=none,id=d0,format=raw" -device virtio-scsi-pci,id=vs0 -device scsi-hd,drive=d0,bus=vs0.0 &
gpid=$!
if "$HERE/wait-marker.sh" "$work/hotplug.log" SCSIGATE-HOTPLUG-READY 200; then
    "$HERE/qemu-hmp.sh" $port "drive_add 0 if=none,id=d1,file=$work/hot.img,format=raw"
    "$HERE/qemu-hmp.sh" $port "device_add scsi-hd,drive=d1,id=hd1,bus=vs0.0,serial=SELFTEST-HOT"
    "$HERE/wait-marker.sh" "$work/hotplug.log" SCSIGATE-HOTPLUG-ADDED 100 && "$HERE/qemu-hmp.sh" $port "device_del hd1"
fi
wait $gpid
result "virtio-scsi hotplug" $?

if [ $pv = 1 ]; then
    "$HERE/run-guest.sh" "${sid[@]}" --quiet --test multi --log "$work/pvscsi.log" --timeout 600 \
        --append scsigate.tests=smoke,fio-verify,pattern \
        -- -drive "file=$img,if=none,id=d0,format=raw,cache=none,aio=native" \
        -device pvscsi,id=pv0 -device scsi-hd,drive=d0,bus=pv0.0,serial=SELFTEST-PV
    result "pvscsi guest tests" $?
    "$HERE/check-pattern.sh" "$work/pvscsi.log" "$img"; result "pvscsi byte check" $?
fi
[ $keep = 1 ] && echo "selftest: logs and image kept in $work"
echo "selftest: $pass passed, $fail failed"
[ $fail = 0 ]
