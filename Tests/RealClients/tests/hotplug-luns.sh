#!/bin/sh
# hotplug-luns: LUNs hot-added by the host must appear at the address REPORT LUNS gives them, once.
#   scsigate.luns=V:SERIAL,...   the LUNs the host adds (value and serial), e.g. 2:SGCI-L2,300:SGCI-L300
#   scsigate.hotplug_wait=SECS   how long to wait for each step (default 120)
# Host side: wait for SCSIGATE-HOTLUNS-READY, add the LUNs; wait for SCSIGATE-HOTLUNS-WAIT-REMOVE, remove them.
# For each LUN: exactly one SCSI device reports its serial, and its H:C:T:L (sysfs) has the LUN number Linux
# derives from the REPORT LUNS entry of that LUN (peripheral: V; flat: 0x4000 | V, e.g. 16684 for 300).
# Then a full rescan of the host ("- - -" > scan) must leave exactly one device per LUN, and removing the LUNs
# must remove those devices (the removal event names the same number).
. /tests/lib/common.sh
max=${SCSIGATE_HOTPLUG_WAIT:-120}
[ -n "${SCSIGATE_LUNS:-}" ] || { log "scsigate.luns=V:SERIAL,... is required"; exit 127; }
wait_for_disks || exit 1
d0=$(find_disk) || exit 1
sg0=$(disk_sg "$d0") || { log "FAIL: /dev/$d0 has no sg device"; exit 1; }
hctl0=$(basename "$(readlink -f "/sys/block/$d0/device")")
host=${hctl0%%:*}
log "LUN 0: /dev/$d0 $sg0 at $hctl0 (host$host)"
echo "SCSIGATE-HOTLUNS-READY host=$host"

# devices_with SERIAL: the H:C:T:L of every SCSI disk of host $host reporting SERIAL
devices_with() {
    local d h
    for d in $(list_disks); do
        h=$(basename "$(readlink -f "/sys/block/$d/device")")
        case $h in "$host":*) ;; *) continue ;; esac
        [ "$(disk_serial "$d")" = "$1" ] && echo "$h"
    done
}
# linux_lun V: the number Linux gives LUN V, from its REPORT LUNS entry (scsilun_to_int of a single-level
# address: bytes 0-1). Empty if REPORT LUNS does not list V.
linux_lun() {
    local h b0 b1 v
    for h in $(sg_luns -q "/dev/$sg0" 2>/dev/null); do
        b0=$((0x$(echo "$h" | cut -c1-2))); b1=$((0x$(echo "$h" | cut -c3-4)))
        case $((b0 >> 6)) in
            0) v=$b1; [ $b0 = 0 ] || continue ;;
            1) v=$(( ((b0 & 63) << 8) | b1 )) ;;
            *) continue ;;
        esac
        [ "$v" = "$1" ] && { echo $(( (b0 << 8) | b1 )); return 0; }
    done
    return 1
}
# check_all WHEN: every LUN has exactly one device, at Linux's number for its REPORT LUNS entry
check_all() {
    local ok=0 e v s want devs n
    for e in $(echo "$SCSIGATE_LUNS" | tr ',' ' '); do
        v=${e%%:*}; s=${e#*:}
        want=$(linux_lun "$v") || { log "FAIL ($1): REPORT LUNS does not list LUN $v"; ok=1; continue; }
        devs=$(devices_with "$s" | tr '\n' ' ')
        n=$(echo $devs | wc -w)
        echo "SCSIGATE-HOTLUN when=$1 lun=$v serial=$s report_luns_linux_lun=$want devices=$(echo $devs | tr ' ' ',')"
        if [ "$n" != 1 ]; then log "FAIL ($1): LUN $v (serial $s) has $n devices: $devs"; ok=1
        elif [ "${devs%% *}" != "$host:0:0:$want" ]; then log "FAIL ($1): LUN $v is at ${devs%% *}, REPORT LUNS gives $host:0:0:$want"; ok=1
        fi
    done
    return $ok
}
all_present() {
    local e
    for e in $(echo "$SCSIGATE_LUNS" | tr ',' ' '); do [ -n "$(devices_with "${e#*:}")" ] || return 1; done
}
n=0
until all_present || [ $n -ge $((max * 5)) ]; do sleep 0.2; n=$((n + 1)); done
sleep 2   # a second device for the same LUN would show up now
rc=0
all_present || { log "FAIL: not every hot-added LUN appeared within ${max}s"; rc=1; }
echo "== sg_luns /dev/$sg0"; sg_luns -d "/dev/$sg0" 2>&1
check_all hot-add || rc=1
echo "- - -" > "/sys/class/scsi_host/host$host/scan"
sleep 2
check_all rescan || rc=1
log "disks after the rescan: $(list_disks | tr '\n' ' ')"
echo "SCSIGATE-HOTLUNS-WAIT-REMOVE"
n=0
while [ $n -lt $((max * 5)) ]; do
    left=0
    for e in $(echo "$SCSIGATE_LUNS" | tr ',' ' '); do [ -z "$(devices_with "${e#*:}")" ] || left=$((left + 1)); done
    [ $left = 0 ] && break
    sleep 0.2; n=$((n + 1))
done
if [ $left = 0 ]; then echo "SCSIGATE-HOTLUNS-REMOVED after=$((n / 5))s"
else log "FAIL: $left hot-added LUN(s) still present ${max}s after their removal"; rc=1; fi
[ $rc = 0 ] && log PASS || log FAIL
exit $rc
