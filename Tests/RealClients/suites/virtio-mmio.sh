# virtio-mmio: QEMU 7.2 `-M microvm,acpi=on` (no PCI) with -device vhost-user-scsi and -device vhost-user-blk,
# the virtio-mmio variants, on the default config's queue_size (128). Over MMIO the guest driver picks the ring
# size itself (Linux takes QEMU's QueueNumMax, 1024); the gateway must accept it. fio verify on both disks, and
# the gateway log must show the rings the driver chose.
suite_virtio_mmio() {
    DIR="$WORK/vmmio"; mkdir -p "$DIR"
    { gateway_header "$DIR"
      printf '\n[[controller]]\nname = "mscsi0"\ntransport = "vhost-user-scsi"\nsocket = "%s"\n' "$DIR/mscsi0.sock"
      printf '\n[[controller.lun]]\nlun = 0\n%s\n' "$(file_lun mscsi0.img 128M 'serial = "SGCI-MS0"')"
      printf '\n[[controller]]\nname = "mblk0"\ntransport = "vhost-user-blk"\nsocket = "%s"\n' "$DIR/mblk0.sock"
      printf '\n[[controller.lun]]\n%s\n' "$(file_lun mblk0.img 128M 'serial = "SGCI-MB0"')"
    } > "$DIR/gw.toml"
    serve virtio-mmio || return
    local rss0 rss1 gpid rc
    rss0=$(awk '/VmRSS/ {print $2}' "/proc/$GW_PID/status")
    guest_run --quiet --machine microvm,acpi=on --test fio-disks --log "$DIR/guest.log" --timeout 900 \
        --append "scsigate.disks=sda,vda scsigate.expect_mmio=1 scsigate.size=32M" \
        -- -chardev "socket,id=c0,path=$DIR/mscsi0.sock" -device vhost-user-scsi,chardev=c0 \
           -chardev "socket,id=c1,path=$DIR/mblk0.sock" -device vhost-user-blk,chardev=c1 &
    gpid=$!
    # the gateway's memory while the guest's four 1024-entry rings run (sampled during the second disk's fio)
    bash "$HERE/wait-marker.sh" "$DIR/guest.log" '\[fio-verify\] disk /dev/vda' 600 >/dev/null \
        && rss1=$(awk '/VmRSS/ {print $2}' "/proc/$GW_PID/status")
    wait $gpid; rc=$?
    check "virtio-mmio microvm guest: both disks on virtio-mmio, fio verify on the virtio-scsi and the virtio-blk disk" $rc
    echo "[virtio-mmio] gateway RSS: ${rss0:-?} KiB before the guest, ${rss1:-?} KiB with its rings running"
    grep -a 'virtio-mmio\|fio 4k\|fio 64k\|PCI devices' "$DIR/guest.log" | tr -d '\r' | sed 's/^/[virtio-mmio] /'
    grep -a 'entries (.*chosen by the driver' "$DIR/gw.log" | cut -c1-200 | sed 's/^/[virtio-mmio] /'
    # virtio-scsi rings 0-2 and the virtio-blk ring 0: four ring starts of 1024 entries
    [ "$(grep -c ': 1024 entries (.*chosen by the driver (queue_size 128)' "$DIR/gw.log")" -ge 4 ]
    check "virtio-mmio rings of 1024 entries accepted on queue_size 128 (virtio-scsi request queue, virtio-blk queue)" $?
    ! grep -q "outside 1\.\.\." "$DIR/gw.log"; check "virtio-mmio no ring size refused" $?
    stop_gateway; check "virtio-mmio gateway drains and exits 0 on SIGTERM" $?
}
REGISTERED_SUITES+=(virtio-mmio)
