#!/bin/sh
# resize: the selected disk's size must change while the guest runs, with no rescan and no I/O
# from the guest (virtio-blk: the config-change interrupt; virtio-scsi/PVSCSI: the transport's
# event). Host side: wait for SCSIGATE-RESIZE-WAIT, resize the LUN, wait for the exit marker.
#   scsigate.resize_wait=SECS   how long to wait (default 120)
#   scsigate.expect_size=BYTES  the size the disk must reach (default: any other size)
. /tests/lib/common.sh
wait_for_disks || exit 1
d=$(find_disk) || exit 1
max=${SCSIGATE_RESIZE_WAIT:-120}
size0=$(disk_bytes "$d")
echo "SCSIGATE-RESIZE-WAIT disk=$d bytes=$size0"
n=0
while [ $n -lt $((max * 5)) ]; do
    size1=$(disk_bytes "$d")
    if [ "$size1" != "$size0" ] && { [ -z "${SCSIGATE_EXPECT_SIZE:-}" ] || [ "$size1" = "$SCSIGATE_EXPECT_SIZE" ]; }; then
        echo "SCSIGATE-RESIZED disk=$d bytes=$size1 after=$((n / 5))s"
        # the new end of the disk is readable
        last=$((size1 / 4096 - 1))
        if dd if="/dev/$d" of=/dev/null bs=4096 skip=$last count=1 iflag=direct 2>/dev/null; then
            log PASS; exit 0
        fi
        log "FAIL: cannot read the last 4 KiB block ($last) of /dev/$d"; exit 1
    fi
    sleep 0.2; n=$((n + 1))
done
log "FAIL: /dev/$d still $(disk_bytes "$d") bytes after ${max}s (expected ${SCSIGATE_EXPECT_SIZE:-a change})"
exit 1
