#!/bin/sh
# reconnect: fio-verify (see fio-verify.sh for its scsigate.* options) on the selected disk while the host kills
# and restarts the gateway; optionally with task management and a hot-plugged LUN in the mix:
#   scsigate.disk_serial=S       fio on the disk with serial S (device names follow the scan order, which varies)
#   scsigate.tmf_serial=S        meanwhile, a loop sends LOGICAL UNIT RESETs to the disk with serial S (sg_reset -d)
#                                while a direct read of it is in flight (the reset waits for it), until fio ends
#   scsigate.hotplug_serial=S    after fio, wait (scsigate.hotplug_wait, default 120 s) until a disk with
#                                serial S exists (the host adds that LUN around a kill)
# Prints every disk at the end as "SCSIGATE-DISK name=... hctl=... serial=...".
. /tests/lib/common.sh
wait_for_disks || exit 1
sleep 1   # let the other LUNs of the scan settle
with_serial() { for d in $(list_disks); do [ "$(disk_serial "$d")" = "$1" ] && { echo "$d"; return 0; }; done; return 1; }
if [ -n "${SCSIGATE_DISK_SERIAL:-}" ]; then
    SCSIGATE_DISK=$(with_serial "$SCSIGATE_DISK_SERIAL") || { log "FAIL: no disk with serial $SCSIGATE_DISK_SERIAL"; exit 1; }
    export SCSIGATE_DISK
fi
tmfpid=
if [ -n "${SCSIGATE_TMF_SERIAL:-}" ]; then
    t=$(with_serial "$SCSIGATE_TMF_SERIAL") || { log "FAIL: no disk with serial $SCSIGATE_TMF_SERIAL"; exit 1; }
    sg=$(disk_sg "$t") || { log "FAIL: no sg device for $t"; exit 1; }
    (
        n=0 f=0
        while [ ! -e /tmp/stop-tmf ]; do
            dd if="/dev/$t" of=/dev/null bs=64k count=32 iflag=direct 2>/dev/null &
            if sg_reset -d "/dev/$sg" >/dev/null 2>&1; then n=$((n + 1)); else f=$((f + 1)); fi
            wait
        done
        echo "SCSIGATE-TMF disk=$t logical_unit_resets=$n failed=$f"
    ) &
    tmfpid=$!
    log "LOGICAL UNIT RESET loop on /dev/$t ($sg, serial $SCSIGATE_TMF_SERIAL) started"
fi
SCSIGATE_TEST=fio-verify /bin/sh /tests/fio-verify.sh
rc=$?
touch /tmp/stop-tmf
[ -n "$tmfpid" ] && wait "$tmfpid"
if [ -n "${SCSIGATE_HOTPLUG_SERIAL:-}" ]; then
    echo "SCSIGATE-RECONNECT-WAIT-HOTPLUG serial=$SCSIGATE_HOTPLUG_SERIAL"
    max=${SCSIGATE_HOTPLUG_WAIT:-120} n=0 found=
    while [ $n -lt $((max * 5)) ]; do
        found=$(with_serial "$SCSIGATE_HOTPLUG_SERIAL")
        [ -n "$found" ] && break
        sleep 0.2; n=$((n + 1))
    done
    sleep 2   # a second device for the same LUN would show up now
    [ -n "$found" ] || { log "FAIL: no disk with serial $SCSIGATE_HOTPLUG_SERIAL within ${max}s"; rc=1; }
fi
for d in $(list_disks); do
    echo "SCSIGATE-DISK name=$d hctl=$(basename "$(readlink -f "/sys/block/$d/device")") serial=$(disk_serial "$d")"
done
[ $rc = 0 ] && log PASS || log FAIL
exit $rc
