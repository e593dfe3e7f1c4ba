#!/bin/sh
# fio-disks: fio-verify (see fio-verify.sh and its scsigate.* options) on each disk of scsigate.disks=LIST
# (e.g. sda,vda), one after the other. Prints the device path of each disk; with scsigate.expect_mmio=1 each
# must sit on a virtio-mmio device (a platform device bound to the virtio-mmio driver) and no PCI device may exist.
. /tests/lib/common.sh
[ -n "${SCSIGATE_DISKS:-}" ] || { log "scsigate.disks=LIST is required"; exit 127; }
failed=0
if [ "${SCSIGATE_EXPECT_MMIO:-0}" = 1 ]; then
    log "virtio-mmio devices: $(ls /sys/bus/platform/drivers/virtio-mmio 2>/dev/null | grep -v 'bind\|uevent' | tr '\n' ' ')"
    pci=$(ls /sys/bus/pci/devices 2>/dev/null | wc -l)
    log "PCI devices: $pci"
    [ "$pci" = 0 ] || { log "FAIL: $pci PCI device(s) on a microvm guest"; failed=$((failed + 1)); }
fi
for d in $(echo "$SCSIGATE_DISKS" | tr ',' ' '); do
    if ! SCSIGATE_DISK=$d wait_for_disks; then failed=$((failed + 1)); continue; fi
    path=$(readlink -f "/sys/block/$d/device")
    log "disk $d: $path"
    if [ "${SCSIGATE_EXPECT_MMIO:-0}" = 1 ]; then
        mmio=
        for p in /sys/bus/platform/drivers/virtio-mmio/*; do
            [ -L "$p" ] || continue
            case $path in "$(readlink -f "$p")"/*) mmio=${p##*/} ;; esac
        done
        if [ -n "$mmio" ]; then log "disk $d is on virtio-mmio device $mmio"
        else log "FAIL: disk $d is not on a virtio-mmio device"; failed=$((failed + 1)); fi
    fi
    SCSIGATE_DISK=$d SCSIGATE_TEST=fio-verify /bin/sh /tests/fio-verify.sh || failed=$((failed + 1))
done
[ $failed = 0 ] && log PASS || log "FAIL ($failed)"
exit $failed
