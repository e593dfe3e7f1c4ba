#!/bin/sh
# virtio-pci-disks: what the guest sees of virtio-pci functions (e.g. served over vfio-user): fio verify on the
# virtio-scsi LUN 0 disk and the virtio-blk disk, libiscsi's conformance suite on the virtio-scsi disk, a pattern
# on both for the host's byte check, reads from every CPU (multiqueue); then a hot-added virtio-scsi LUN, its
# removal, and a resized virtio-blk disk. Prints facts the host checks; fails on fio, pattern or conformance
# errors (conformance.sh's rules) and timeouts.
#   scsigate.hotplug_serial=S   serial of the LUN the host hot-adds (required)
#   scsigate.hotplug_wait=SECS  how long to wait for the hot-added LUN, its removal and the resize (default 120)
#   fio-verify's options (scsigate.size, scsigate.bs, ...) apply to each disk, conformance.sh's (scsigate.cu_*)
#   and pattern.sh's to their runs
# Lines:
#   SCSIGATE-PCI dev=D id=VVVV:DDDD driver=DRV virtio=virtioN virtio_driver=DRV   per 1af4 PCI function
#   SCSIGATE-DISK when=boot|hotplug|rescan name=sdX hctl=H:C:T:L bytes=N serial=S  per SCSI disk (VPD 0x80)
#   SCSIGATE-DISK when=... name=vdX bytes=N serial=S                               per virtio-blk disk
#   SCSIGATE-FIO disk=D rc=N
#   SCSIGATE-CONFORMANCE disk=sdX rc=N   (conformance.sh's SCSIGATE-CUNIT-* lines and CUnit output before it)
#   SCSIGATE-PATTERN disk=D ...          (pattern.sh, per disk)
#   SCSIGATE-MQ disk=sdX hw_queues=N cpus=N  then SCSIGATE-MQ-IO disk=sdX cpu=N rc=N per CPU (direct reads there)
#   SCSIGATE-VPCI-WAIT-HOTPLUG  (host: add the LUN)  SCSIGATE-HOTPLUG serial=S devices=N hctl=...
#   SCSIGATE-VPCI-WAIT-REMOVE disk=sdX  (host: remove it)  SCSIGATE-REMOVED disk=sdX after=S  (no rescan)
#   SCSIGATE-VPCI-WAIT-RESIZE disk=vdX bytes=N  (host: resize)  SCSIGATE-RESIZED disk=vdX bytes=N after=S
. /tests/lib/common.sh
[ -n "${SCSIGATE_HOTPLUG_SERIAL:-}" ] || { log "scsigate.hotplug_serial=S is required"; exit 127; }
max=${SCSIGATE_HOTPLUG_WAIT:-120}
rc=0
# wait for at least one sd and one vd disk
n=0
until ls /sys/block | grep -q '^sd' && ls /sys/block | grep -q '^vd' || [ $n -ge 150 ]; do sleep 0.2; n=$((n + 1)); done
sleep 1   # further LUNs of the scan
for p in /sys/bus/pci/devices/*; do
    [ "$(cat "$p/vendor")" = 0x1af4 ] || continue
    drv=$(basename "$(readlink -f "$p/driver" 2>/dev/null)" 2>/dev/null)
    v=$(ls -d "$p"/virtio* 2>/dev/null | head -1)
    vdrv=
    [ -n "$v" ] && vdrv=$(basename "$(readlink -f "$v/driver" 2>/dev/null)" 2>/dev/null)
    id=$(cat "$p/vendor" "$p/device" | sed 's/^0x//' | tr '\n' ':' | sed 's/:$//')
    echo "SCSIGATE-PCI dev=${p##*/} id=$id driver=${drv:-none} virtio=${v##*/} virtio_driver=${vdrv:-none}"
done
disks() {  # disks WHEN
    local d
    for d in $(list_disks); do
        case $d in
            sd*) echo "SCSIGATE-DISK when=$1 name=$d hctl=$(basename "$(readlink -f "/sys/block/$d/device")") bytes=$(disk_bytes "$d") serial=$(disk_serial "$d")" ;;
            *) echo "SCSIGATE-DISK when=$1 name=$d bytes=$(disk_bytes "$d") serial=$(disk_serial "$d")" ;;
        esac
    done
}
disks boot
sd=
for d in $(list_disks | grep '^sd'); do   # LUN 0 of the virtio-scsi controller
    case $(basename "$(readlink -f "/sys/block/$d/device")") in *:0:0:0) sd=$d; break ;; esac
done
vd=$(list_disks | grep '^vd' | head -1)
for d in $sd $vd; do
    SCSIGATE_DISK=$d SCSIGATE_TEST=fio-verify /bin/sh /tests/fio-verify.sh; r=$?
    echo "SCSIGATE-FIO disk=$d rc=$r"
    [ $r = 0 ] || rc=1
done
if [ -n "$sd" ]; then
    SCSIGATE_DISK=$sd SCSIGATE_TEST=conformance /bin/sh /tests/conformance.sh; r=$?
    echo "SCSIGATE-CONFORMANCE disk=$sd rc=$r"
    [ $r = 0 ] || rc=1
fi
for d in $sd $vd; do   # after fio and conformance: nothing writes there any more
    SCSIGATE_DISK=$d SCSIGATE_TEST=pattern /bin/sh /tests/pattern.sh || rc=1
done
# multiqueue: blk-mq maps each CPU to a hardware queue; direct reads pinned to each CPU use each queue
if [ -n "$sd" ]; then
    cpus=$(grep -c '^processor' /proc/cpuinfo)
    echo "SCSIGATE-MQ disk=$sd hw_queues=$(ls "/sys/block/$sd/mq" | wc -l) cpus=$cpus"
    c=0
    while [ $c -lt "$cpus" ]; do
        taskset $((1 << c)) dd if="/dev/$sd" of=/dev/null bs=4096 count=256 iflag=direct 2>/dev/null; r=$?
        echo "SCSIGATE-MQ-IO disk=$sd cpu=$c rc=$r"
        [ $r = 0 ] || rc=1
        c=$((c + 1))
    done
fi

# hotplug: the host adds a LUN with serial S to the virtio-scsi controller
with_serial() {
    local d
    for d in $(list_disks); do
        case $d in sd*) [ "$(disk_serial "$d")" = "$1" ] && basename "$(readlink -f "/sys/block/$d/device")" ;; esac
    done
}
echo "SCSIGATE-VPCI-WAIT-HOTPLUG"
n=0
until [ -n "$(with_serial "$SCSIGATE_HOTPLUG_SERIAL")" ] || [ $n -ge $((max * 5)) ]; do sleep 0.2; n=$((n + 1)); done
sleep 2   # a second device for the same LUN would show up now
h=$(with_serial "$SCSIGATE_HOTPLUG_SERIAL" | tr '\n' ',')
echo "SCSIGATE-HOTPLUG when=hotplug serial=$SCSIGATE_HOTPLUG_SERIAL devices=$(echo "$h" | tr ',' ' ' | wc -w) hctl=${h%,} after=$((n / 5))s"
disks hotplug
host=${sd:+$(basename "$(readlink -f "/sys/block/$sd/device")")}
host=${host%%:*}
[ -n "$host" ] && echo "- - -" > "/sys/class/scsi_host/host$host/scan"
sleep 2
h=$(with_serial "$SCSIGATE_HOTPLUG_SERIAL" | tr '\n' ',')
echo "SCSIGATE-HOTPLUG when=rescan serial=$SCSIGATE_HOTPLUG_SERIAL devices=$(echo "$h" | tr ',' ' ' | wc -w) hctl=${h%,}"
disks rescan

# removal: the host removes the hot-added LUN; its disk must go without a rescan (virtio-scsi event)
hd=
for d in $(list_disks); do
    case $d in sd*) [ "$(disk_serial "$d")" = "$SCSIGATE_HOTPLUG_SERIAL" ] && hd=$d ;; esac
done
if [ -n "$hd" ]; then
    echo "SCSIGATE-VPCI-WAIT-REMOVE disk=$hd"
    n=0
    while [ -e "/sys/block/$hd" ] && [ $n -lt $((max * 5)) ]; do sleep 0.2; n=$((n + 1)); done
    if [ -e "/sys/block/$hd" ]; then log "FAIL: /dev/$hd still present ${max}s after the removal"; rc=1
    else echo "SCSIGATE-REMOVED disk=$hd after=$((n / 5))s"; fi
fi

# resize: the host changes the virtio-blk disk's size (config-change interrupt, no rescan)
if [ -n "$vd" ]; then
    size0=$(disk_bytes "$vd")
    echo "SCSIGATE-VPCI-WAIT-RESIZE disk=$vd bytes=$size0"
    n=0
    until [ "$(disk_bytes "$vd")" != "$size0" ] || [ $n -ge $((max * 5)) ]; do sleep 0.2; n=$((n + 1)); done
    size1=$(disk_bytes "$vd")
    if [ "$size1" != "$size0" ]; then
        echo "SCSIGATE-RESIZED disk=$vd bytes=$size1 after=$((n / 5))s"
        dd if="/dev/$vd" of=/dev/null bs=4096 skip=$((size1 / 4096 - 1)) count=1 iflag=direct 2>/dev/null \
            || { log "FAIL: cannot read the last 4 KiB of /dev/$vd"; rc=1; }
    else
        log "FAIL: /dev/$vd still $size1 bytes after ${max}s"; rc=1
    fi
fi
[ $rc = 0 ] && log PASS || log FAIL
exit $rc
