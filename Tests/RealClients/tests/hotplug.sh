#!/bin/sh
# hotplug: watch for a disk to appear and then disappear while the guest runs, with no
# manual rescan (virtio-scsi events, PVSCSI DEV_ADDED/DEV_REMOVED messages, virtio-blk PCI hotplug).
# Host side: wait for SCSIGATE-HOTPLUG-READY (wait-marker.sh), add the LUN, wait for
# SCSIGATE-HOTPLUG-ADDED, remove it, wait for the exit marker.
#   scsigate.hotplug_wait=SECS      how long to wait for each event (default 120)
#   scsigate.expect_serial=S        the added disk must report this serial
#   scsigate.hotplug_remove=0       only check the addition
#   scsigate.hotplug_resize=1       after the addition, wait for the disk's size to change
#                                   (host: resize on SCSIGATE-HOTPLUG-WAIT-RESIZE), no manual rescan
. /tests/lib/common.sh
max=${SCSIGATE_HOTPLUG_WAIT:-120}
before=" $(list_disks | tr '\n' ' ') "
echo "SCSIGATE-HOTPLUG-READY disks=$(echo $before | tr ' ' ',')"
new=
n=0
while [ $n -lt $((max * 5)) ]; do
    for d in $(list_disks); do
        case $before in *" $d "*) ;; *) new=$d; break 2 ;; esac
    done
    sleep 0.2; n=$((n + 1))
done
[ -n "$new" ] || { log "FAIL: no new disk within ${max}s"; exit 1; }
sleep 1
serial=$(disk_serial "$new")
echo "SCSIGATE-HOTPLUG-ADDED disk=$new sg=$(disk_sg "$new") vendor=$(disk_vendor "$new") serial=$serial bytes=$(disk_bytes "$new") after=$((n / 5))s"
rc=0
if [ -n "${SCSIGATE_EXPECT_SERIAL:-}" ] && [ "$serial" != "$SCSIGATE_EXPECT_SERIAL" ]; then
    log "FAIL: serial '$serial', expected '$SCSIGATE_EXPECT_SERIAL'"; rc=1
fi
dd if="/dev/$new" of=/dev/null bs=4k count=16 iflag=direct 2>/dev/null || { log "FAIL: cannot read /dev/$new"; rc=1; }
if [ "${SCSIGATE_HOTPLUG_RESIZE:-0}" = 1 ]; then
    size0=$(disk_bytes "$new")
    echo "SCSIGATE-HOTPLUG-WAIT-RESIZE disk=$new bytes=$size0"
    n=0
    while [ "$(disk_bytes "$new")" = "$size0" ] && [ $n -lt $((max * 5)) ]; do
        # a read lets a unit attention (CAPACITY DATA HAS CHANGED) reach the guest as well
        dd if="/dev/$new" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null
        sleep 0.2; n=$((n + 1))
    done
    size1=$(disk_bytes "$new")
    if [ "$size1" = "$size0" ]; then log "FAIL: size of /dev/$new still $size0 after ${max}s"; rc=1
    else echo "SCSIGATE-HOTPLUG-RESIZED disk=$new bytes=$size1 after=$((n / 5))s"; fi
fi
[ "${SCSIGATE_HOTPLUG_REMOVE:-1}" = 0 ] && { [ $rc = 0 ] && log PASS; exit $rc; }
echo "SCSIGATE-HOTPLUG-WAIT-REMOVE disk=$new"
n=0
while [ -e "/sys/block/$new" ] && [ $n -lt $((max * 5)) ]; do sleep 0.2; n=$((n + 1)); done
if [ -e "/sys/block/$new" ]; then log "FAIL: /dev/$new still present after ${max}s"; exit 1; fi
echo "SCSIGATE-HOTPLUG-REMOVED disk=$new after=$((n / 5))s"
[ $rc = 0 ] && log PASS || log FAIL
exit $rc
