#!/bin/sh
# discard: fill three regions, then DISCARD region 0 and WRITE ZEROES region 1
# (blkdiscard, blkdiscard -z); region 1 must read back as zeroes and region 2 unchanged.
# Prints SCSIGATE-DISCARD / SCSIGATE-WRITE-ZEROES lines (offset, bytes) for host-side hole checks.
#   scsigate.region_mb=N         size of each region in MiB (default 8)
#   scsigate.discard_optional=1  pass when the disk does not advertise discard
. /tests/lib/common.sh
wait_for_disks || exit 1
d=$(find_disk) || exit 1
n=${SCSIGATE_REGION_MB:-8}
b=$((n * 1048576))
q=/sys/block/$d/queue
log "disk /dev/$d discard_max_bytes=$(cat $q/discard_max_bytes) discard_granularity=$(cat $q/discard_granularity) write_zeroes_max_bytes=$(cat $q/write_zeroes_max_bytes 2>/dev/null)"
dd if=/dev/urandom of="/dev/$d" bs=1M count=$((3 * n)) oflag=direct conv=fsync 2>/dev/null || { log "FAIL: fill"; exit 1; }
keep=$(dd if="/dev/$d" bs=1M skip=$((2 * n)) count="$n" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
zero=$(dd if=/dev/zero bs=1M count="$n" 2>/dev/null | sha256sum | cut -d' ' -f1)
fail=0
if [ "$(cat $q/discard_max_bytes)" = 0 ]; then
    log "disk does not advertise discard"
    [ "${SCSIGATE_DISCARD_OPTIONAL:-0}" = 1 ] || fail=1
else
    if blkdiscard -o 0 -l "$b" "/dev/$d"; then
        echo "SCSIGATE-DISCARD disk=$d offset=0 bytes=$b"
    else
        log "FAIL: blkdiscard"; fail=1
    fi
fi
if blkdiscard -z -o "$b" -l "$b" "/dev/$d"; then
    echo "SCSIGATE-WRITE-ZEROES disk=$d offset=$b bytes=$b"
    got=$(dd if="/dev/$d" bs=1M skip="$n" count="$n" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ "$got" = "$zero" ]; then log "write-zeroes region reads as zeroes"; else log "FAIL: write-zeroes region is not zero"; fail=1; fi
else
    log "FAIL: blkdiscard -z"; fail=1
fi
got=$(dd if="/dev/$d" bs=1M skip=$((2 * n)) count="$n" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$got" = "$keep" ]; then log "untouched region unchanged"; else log "FAIL: untouched region changed"; fail=1; fi
[ $fail = 0 ] && log "PASS" || log "FAIL"
exit $fail
