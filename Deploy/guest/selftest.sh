#!/usr/bin/env bash
# Prove the harness itself against QEMU's built-in devices (no ScsiGate involved):
#  1. virtio-scsi + scsi-hd: smoke, discard, fio-verify, conformance, pattern (+ host byte check)
#  2. virtio-blk: smoke, discard, fio-verify, pattern (+ host byte check)
#  3. (--pvscsi) pvscsi + scsi-hd: smoke, fio-verify, pattern
# Usage: selftest.sh [--sid] [--pvscsi] [--max-failed N] [--keep]
#   --sid           use the sid chroot's QEMU (11.x) instead of the host's
#   --max-failed N  conformance failures allowed for QEMU's scsi-hd (default 52, QEMU 7.2's count)
#   --keep          keep the disk image and logs in the work dir
# Exit 0 when every guest test passed and the byte checks matched.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
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
work=$(mktemp -d /tmp/scsigate-selftest.XXXXXX)
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
