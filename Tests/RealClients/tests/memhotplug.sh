#!/bin/sh
# memhotplug: guest RAM grows while the disk is in use (QEMU pc-dimm hotplug: a vhost-user back-end
# gets VHOST_USER_ADD_MEM_REG for the new memfd region), then fio verify runs with its buffers in the
# new memory. Boot with memhp_default_state=online_movable: the DIMM becomes ZONE_MOVABLE, the zone
# user pages are taken from first, so fio's buffers land in it.
# Then the DIMM is unplugged again (VHOST_USER_REM_MEM_REG) and a short fio verify runs.
# Host side: wait for SCSIGATE-MEMHP-READY, hotplug the DIMM from the monitor; on
# SCSIGATE-MEMHP-WAIT-REMOVE, device_del it; wait for the exit marker.
#   scsigate.memhp_wait=SECS  how long to wait for the memory (default 120)
. /tests/lib/common.sh
wait_for_disks || exit 1
d=$(find_disk) || exit 1
max=${SCSIGATE_MEMHP_WAIT:-120}
total() { awk '/^MemTotal/ {print $2}' /proc/meminfo; }
movable() { awk '/^Node .* zone +Movable/ {z=1; next} /^Node / {z=0} z && /^ +present / {print $2; exit}' /proc/zoneinfo; }
movable_free() { awk '/^Node .* zone +Movable/ {z=1; next} /^Node / {z=0} z && /^ +pages free / {print $3; exit}' /proc/zoneinfo; }
mem0=$(total)
dd if="/dev/$d" of=/dev/null bs=64k count=16 iflag=direct 2>/dev/null || { log "FAIL: cannot read /dev/$d before the hotplug"; exit 1; }
echo "SCSIGATE-MEMHP-READY memtotal_kib=$mem0"
n=0
while [ "$(total)" = "$mem0" ] && [ $n -lt $((max * 5)) ]; do sleep 0.2; n=$((n + 1)); done
mem1=$(total)
[ "$mem1" != "$mem0" ] || { log "FAIL: MemTotal still $mem0 kB after ${max}s"; exit 1; }
echo "SCSIGATE-MEMHP-ADDED memtotal_kib=$mem1 movable_present_pages=$(movable) after=$((n / 5))s"
[ -n "$(movable)" ] && [ "$(movable)" -gt 0 ] || { log "FAIL: no ZONE_MOVABLE memory (memhp_default_state=online_movable missing?)"; exit 1; }
free0=$(movable_free)
SCSIGATE_TEST=fio-verify /bin/sh /tests/fio-verify.sh &
fio_pid=$!
sleep 3
echo "SCSIGATE-MEMHP-ZONE movable_free_pages before=$free0 during_fio=$(movable_free)"
wait $fio_pid
rc=$?
[ $rc = 0 ] || { log "FAIL: fio verify after the memory hotplug (rc $rc)"; exit $rc; }
# Unplug: the guest offlines the DIMM (its pages migrate back), QEMU sends VHOST_USER_REM_MEM_REG.
echo "SCSIGATE-MEMHP-WAIT-REMOVE memtotal_kib=$(total)"
n=0
while [ "$(total)" != "$mem0" ] && [ $n -lt $((max * 5)) ]; do sleep 0.2; n=$((n + 1)); done
[ "$(total)" = "$mem0" ] || { log "FAIL: MemTotal $(total) kB, not back to $mem0 kB after ${max}s"; exit 1; }
echo "SCSIGATE-MEMHP-REMOVED memtotal_kib=$(total) after=$((n / 5))s"
SCSIGATE_TEST=fio-verify SCSIGATE_BS=4k SCSIGATE_SIZE=8M /bin/sh /tests/fio-verify.sh || { log "FAIL: fio verify after the unplug"; exit 1; }
log PASS
