#!/bin/sh
# fio-randread: 4 KiB random reads, libaio, O_DIRECT, on the selected disk (see lib/common.sh), and
# prints "SCSIGATE-IOPS test=randread bs=4k qd=N iops=X" for host-side comparisons. Read-only.
#   scsigate.iodepth=N    queue depth (default 32)
#   scsigate.runtime=S    seconds (default 15)
#   scsigate.size=SIZE    span of the disk read (default 128M)
. /tests/lib/common.sh
wait_for_disks || exit 1
d=$(find_disk) || exit 1
qd=${SCSIGATE_IODEPTH:-32}
rt=${SCSIGATE_RUNTIME:-15}
size=${SCSIGATE_SIZE:-128M}
log "disk /dev/$d vendor=$(disk_vendor "$d") qd=$qd runtime=${rt}s size=$size"
out=/tmp/fio-randread.log
fio --name=randread --filename="/dev/$d" --ioengine=libaio --direct=1 --rw=randread --bs=4k \
    --iodepth="$qd" --size="$size" --runtime="$rt" --time_based=1 --group_reporting=1 \
    --output-format=terse --terse-version=3 > "$out" 2>&1
rc=$?
# terse v3: field 8 is read IOPS
iops=$(awk -F';' 'NF > 8 { print $8; exit }' "$out")
cat "$out"
if [ "$rc" = 0 ] && [ -n "$iops" ]; then
    echo "SCSIGATE-IOPS test=randread bs=4k qd=$qd iops=$iops disk=$d"
    exit 0
fi
log "fio-randread: FAIL (rc=$rc)"
exit 1
