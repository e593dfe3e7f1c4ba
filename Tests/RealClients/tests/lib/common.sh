# Guest-side helpers for the ScsiGate test scripts (busybox sh; sourced).
# Parameters come from the kernel command line as SCSIGATE_* (see /init):
#   scsigate.vendor=V   pick the first SCSI disk whose INQUIRY vendor is V
#   scsigate.disk=NAME  pick this block device (sdb, vda, ...) explicitly
#   scsigate.wait=SECS  how long to wait for disks to appear (default 30)

# Debian's static busybox prefers its applets over PATH: call the real tools by path.
blkdiscard() { /usr/sbin/blkdiscard "$@"; }
lsblk() { /usr/bin/lsblk "$@"; }
modprobe() { /usr/sbin/modprobe "$@"; }

log() { echo "[$SCSIGATE_TEST] $*"; }

trim() { sed 's/^[[:space:]]*//;s/[[:space:]]*$//'; }

# all disks: sd* and vd* block devices
list_disks() {
    for d in /sys/block/sd* /sys/block/vd*; do
        [ -e "$d" ] && echo "${d##*/}"
    done
}

# wait until at least one disk (or the one asked for) exists
wait_for_disks() {
    local n=0 max=${SCSIGATE_WAIT:-30}
    while [ $n -lt $((max * 5)) ]; do
        if [ -n "$(find_disk 2>/dev/null)" ]; then return 0; fi
        sleep 0.2; n=$((n + 1))
    done
    log "no matching disk after ${max}s (vendor=${SCSIGATE_VENDOR:-any} disk=${SCSIGATE_DISK:-any})"
    log "block devices: $(ls /sys/block | tr '\n' ' ')"
    return 1
}

disk_vendor() { cat "/sys/block/$1/device/vendor" 2>/dev/null | trim; }
disk_model()  { cat "/sys/block/$1/device/model" 2>/dev/null | trim; }
disk_bytes()  { echo $(( $(cat "/sys/block/$1/size") * 512 )); }

# sgN of an sd disk (empty for virtio-blk)
disk_sg() {
    local s
    for s in /sys/block/$1/device/scsi_generic/sg*; do
        [ -e "$s" ] && { echo "${s##*/}"; return 0; }
    done
    return 1
}

# serial: VPD page 0x80 for SCSI disks, sysfs for virtio-blk
disk_serial() {
    local sg
    if sg=$(disk_sg "$1"); then
        sg_inq -p 0x80 "/dev/$sg" 2>/dev/null | sed -n 's/^ *Unit serial number: *//p' | trim
    else
        cat "/sys/block/$1/serial" 2>/dev/null | trim
    fi
}

# the disk a test works on: scsigate.disk, else first SCSI disk with
# scsigate.vendor, else (no vendor given) the first sd disk, else the first vd disk
find_disk() {
    local d
    if [ -n "${SCSIGATE_DISK:-}" ]; then
        [ -e "/sys/block/$SCSIGATE_DISK" ] && echo "$SCSIGATE_DISK" && return 0
        return 1
    fi
    if [ -n "${SCSIGATE_VENDOR:-}" ]; then
        for d in $(list_disks); do
            [ "$(disk_vendor "$d")" = "$SCSIGATE_VENDOR" ] && echo "$d" && return 0
        done
        return 1
    fi
    for d in $(list_disks); do case $d in sd*) echo "$d"; return 0 ;; esac; done
    for d in $(list_disks); do echo "$d"; return 0; done
    return 1
}
