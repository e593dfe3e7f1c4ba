# vfio-user-virtio: virtio-scsi and virtio-blk served as virtio-pci functions over vfio-user (transports
# vfio-user-virtio-scsi and vfio-user-virtio-blk), attached by QEMU 11 (sid chroot) with -device vfio-user-pci
# to a Linux guest with memfd shared RAM and its own virtio_pci, virtio_scsi and virtio_blk drivers. Checks what
# the guest sees: the PCI ids (1af4:1048, 1af4:1042), the virtio drivers bound, the SCSI addresses of LUNs 0
# and 2 (0:0:0:0, 0:0:0:2), sizes and serials (VPD 0x80, virtio-blk serial), fio randwrite+verify on the
# virtio-scsi and the virtio-blk disk; then a CLI hot-add of LUN 5 (at 0:0:0:5, one device after a rescan) and
# a CLI resize of the virtio-blk disk (the guest's size follows); the gateway exits 0 on SIGTERM.
suite_vfio_user_virtio() {
    DIR="$WORK/vfuvirtio"; mkdir -p "$DIR"
    local name=vfio-user-virtio glog="$DIR/guest.log" gpid rc line
    { gateway_header "$DIR"
      printf '\n[[controller]]\nname = "vsc0"\ntransport = "vfio-user-virtio-scsi"\nsocket = "%s"\n' "$DIR/vsc0.sock"
      printf '\n[[controller.lun]]\nlun = 0\n%s\n' "$(file_lun vsc0-l0.img 64M 'serial = "SGCI-VS0"')"
      printf '\n[[controller.lun]]\nlun = 2\n%s\n' "$(file_lun vsc0-l2.img 32M 'serial = "SGCI-VS2"')"
      printf '\n[[controller]]\nname = "vbk0"\ntransport = "vfio-user-virtio-blk"\nsocket = "%s"\n' "$DIR/vbk0.sock"
      printf '\n[[controller.lun]]\n%s\n' "$(file_lun vbk0.img 64M 'serial = "SGCI-VB0"')"
    } > "$DIR/gw.toml"
    serve "$name" || return
    guest_run --sid --quiet --test virtio-pci-disks --log "$glog" --timeout 600 --bind "$DIR" \
        --append "scsigate.hotplug_serial=SGCI-VS5 scsigate.size=16M scsigate.hotplug_wait=120" \
        -- -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$DIR/vsc0.sock\",\"type\":\"unix\"}}" \
           -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$DIR/vbk0.sock\",\"type\":\"unix\"}}" &
    gpid=$!
    if bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-VPCI-WAIT-HOTPLUG 420 >/dev/null; then
        cli lun add vsc0 --lun 5 --backend file --path "$DIR/vsc0-l5.img" --size 48M --create --serial SGCI-VS5 >/dev/null
        check "$name CLI lun add vsc0 --lun 5" $?
        if bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-VPCI-WAIT-RESIZE 200 >/dev/null; then
            cli lun resize vbk0 --size 96M >/dev/null; check "$name CLI lun resize vbk0 --size 96M" $?
        fi
    fi
    wait $gpid; rc=$?
    grep -a '^SCSIGATE-PCI\|^SCSIGATE-DISK\|^SCSIGATE-FIO\|^SCSIGATE-HOTPLUG\|^SCSIGATE-RESIZED\|FAIL' "$glog" | tr -d '\r' | sed "s/^/[$name] /"
    # vf LINE-REGEX: the guest printed a line matching it
    vf() { tr -d '\r' < "$glog" | grep -aqE "$1"; }
    vf '^SCSIGATE-PCI .* id=1af4:1048 driver=virtio-pci virtio=virtio[0-9]+ virtio_driver=virtio_scsi$'
    check "$name guest: PCI function 1af4:1048 (virtio-scsi), virtio-pci and virtio_scsi bound" $?
    vf '^SCSIGATE-PCI .* id=1af4:1042 driver=virtio-pci virtio=virtio[0-9]+ virtio_driver=virtio_blk$'
    check "$name guest: PCI function 1af4:1042 (virtio-blk), virtio-pci and virtio_blk bound" $?
    vf '^SCSIGATE-DISK when=boot name=sd[a-z]+ hctl=[0-9]+:0:0:0 bytes=67108864 serial=SGCI-VS0$'
    check "$name guest: virtio-scsi LUN 0 at H:0:0:0, 64 MiB, VPD 0x80 serial SGCI-VS0" $?
    vf '^SCSIGATE-DISK when=boot name=sd[a-z]+ hctl=[0-9]+:0:0:2 bytes=33554432 serial=SGCI-VS2$'
    check "$name guest: virtio-scsi LUN 2 at H:0:0:2, 32 MiB, VPD 0x80 serial SGCI-VS2" $?
    vf '^SCSIGATE-DISK when=boot name=vd[a-z]+ bytes=67108864 serial=SGCI-VB0$'
    check "$name guest: virtio-blk disk, 64 MiB, serial SGCI-VB0" $?
    vf '^SCSIGATE-FIO disk=sd[a-z]+ rc=0$'
    check "$name guest: fio randwrite+verify 4k/64k on the virtio-scsi disk, 0 errors" $?
    vf '^SCSIGATE-FIO disk=vd[a-z]+ rc=0$'
    check "$name guest: fio randwrite+verify 4k/64k on the virtio-blk disk, 0 errors" $?
    vf '^SCSIGATE-HOTPLUG when=hotplug serial=SGCI-VS5 devices=1 hctl=[0-9]+:0:0:5 '
    check "$name guest: hot-added LUN 5 appears once at H:0:0:5" $?
    vf '^SCSIGATE-HOTPLUG when=rescan serial=SGCI-VS5 devices=1 hctl=[0-9]+:0:0:5$' \
        && vf '^SCSIGATE-DISK when=rescan name=sd[a-z]+ hctl=[0-9]+:0:0:5 bytes=50331648 serial=SGCI-VS5$'
    check "$name guest: LUN 5 still one device (48 MiB) after a full rescan" $?
    vf '^SCSIGATE-RESIZED disk=vd[a-z]+ bytes=100663296 '
    check "$name guest: virtio-blk disk resized to 96 MiB by the config-change interrupt" $?
    check "$name guest test (fio, hotplug, resize)" $rc
    stop_gateway; check "$name gateway drains and exits 0 on SIGTERM" $?
}
REGISTERED_SUITES+=(vfio-user-virtio)
