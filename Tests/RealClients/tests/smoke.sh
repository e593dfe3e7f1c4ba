#!/bin/sh
# smoke: list every disk with vendor/model/serial/size (sysfs + sg_inq).
# Optional checks on the selected disk (see lib/common.sh for selection):
#   scsigate.expect_vendor=V scsigate.expect_serial=S scsigate.expect_size=BYTES
. /tests/lib/common.sh
wait_for_disks || exit 1
sleep 1   # let the remaining LUNs of a scan settle
echo "== disks"
for d in $(list_disks); do
    sg=$(disk_sg "$d")
    printf '%-5s %-5s vendor=%-8s model=%-16s serial=%-20s bytes=%s lbs=%s\n' "$d" "${sg:--}" \
        "$(disk_vendor "$d")" "$(disk_model "$d")" "$(disk_serial "$d")" "$(disk_bytes "$d")" \
        "$(cat /sys/block/$d/queue/logical_block_size)"
done
echo "== sg_map"; sg_map -i -sd 2>&1
for d in $(list_disks); do
    sg=$(disk_sg "$d") || continue
    echo "== sg_inq /dev/$sg ($d)"; sg_inq "/dev/$sg" 2>&1
    echo "== sg_luns /dev/$sg"; sg_luns "/dev/$sg" 2>&1
done
d=$(find_disk) || exit 1
rc=0
check() {  # check WHAT EXPECTED ACTUAL
    [ -z "$2" ] && return 0
    if [ "$2" = "$3" ]; then log "$d $1 = $3 (as expected)"; else log "FAIL: $d $1 = '$3', expected '$2'"; rc=1; fi
}
check vendor "${SCSIGATE_EXPECT_VENDOR:-}" "$(disk_vendor "$d")"
check serial "${SCSIGATE_EXPECT_SERIAL:-}" "$(disk_serial "$d")"
check size "${SCSIGATE_EXPECT_SIZE:-}" "$(disk_bytes "$d")"
[ $rc = 0 ] && log "PASS" || log "FAIL"
exit $rc
