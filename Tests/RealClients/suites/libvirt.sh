# libvirt suite (sourced by ci.sh): libvirtd 9.0 (Debian; started here without systemd by
# Deploy/libvirt/start-libvirtd.sh, and stopped at the end when this suite started it) runs TCG domains
# rendered from Deploy/libvirt/*.xml and defined with virsh, one gateway serving all three controllers:
#   vhost-user-blk   <disk type='vhostuser'> with <reconnect>, QEMU 7.2: serial, size, bytes in the file
#   vhost-user-scsi  <qemu:commandline> vhost-user-scsi-pci, QEMU 7.2: LUN 0 seen, a LUN added with
#                    `scsigate lun add` appears without a rescan; `virsh destroy` mid-run leaves the gateway
#                    serving (the CLI answers) and a second start of the domain sees both LUNs
#   pvscsi           <qemu:commandline> vfio-user-pci, sid's QEMU 11 as <emulator> (Tests/RealClients/chroot/qemu-sid.sh):
#                    serial, size, bytes in the file
REGISTERED_SUITES+=(libvirt)

LV_CONN=qemu:///system
lv() { virsh -q -c "$LV_CONN" "$@"; }

# lv_define TRANSPORT NAME SOCKET TEST APPEND [EMULATOR]: (re)define domain NAME from Deploy/libvirt/TRANSPORT.xml,
# booting the test kernel and initramfs with guest test TEST, console to DIR/NAME.console.
lv_define() {
    bash "$ROOT/Deploy/libvirt/render.sh" "$1" --name "$2" --socket "$3" --memory 512 --on-reboot destroy \
        --emulator "${6:-/usr/bin/qemu-system-x86_64}" --kernel "$VMLINUZ" --initrd "$INITRD" \
        --cmdline "$(sg_guest_cmdline "$4" "$5")" --console-log "$DIR/$2.console" > "$DIR/$2.xml" \
        && lv define "$DIR/$2.xml" >/dev/null
}

# lv_start NAME: start the defined domain with an empty console log.
lv_start() { : > "$DIR/$1.console"; date +%s > "$DIR/$1.t0"; lv start "$1" >/dev/null; }

# lv_wait NAME TIMEOUT: wait for the guest test's end marker and for the domain to shut off; the status is
# the guest test's exit code (124: no marker in time, the domain is destroyed).
lv_wait() {
    local rc
    if ! bash "$HERE/wait-marker.sh" "$DIR/$1.console" SCSIGATE-GUEST-EXIT "$2" >/dev/null; then
        lv destroy "$1" >/dev/null 2>&1; return 124
    fi
    rc=$(tr -d '\r' < "$DIR/$1.console" | sed -n 's/^SCSIGATE-GUEST-EXIT rc=\([0-9]*\).*/\1/p' | tail -1)
    echo "[libvirt $1] guest test rc=$rc after $(( $(date +%s) - $(cat "$DIR/$1.t0") )) s from virsh start (test began at guest uptime $(tr -d '\r' < "$DIR/$1.console" | sed -n 's/^scsigate-guest: running .*modules loaded at \([0-9.]*\)s.*/\1/p' | tail -1) s)"
    for _ in $(seq 1 100); do [ "$(lv domstate "$1" 2>/dev/null)" = "shut off" ] && break; sleep 0.2; done
    [ "$(lv domstate "$1" 2>/dev/null)" = "shut off" ] || { lv destroy "$1" >/dev/null 2>&1; return 125; }
    return "${rc:-125}"
}

# lv_show NAME PATTERN: the console lines matching PATTERN, prefixed with the suite's name.
lv_show() { tr -d '\r' < "$DIR/$1.console" | grep -a -- "$2" | sed "s/^/[libvirt $1] /"; }

# lv_controller NAME TRANSPORT LUN-KEYS: a [[controller]] on DIR/NAME.sock with one [[controller.lun]].
lv_controller() { printf '\n[[controller]]\nname = "%s"\ntransport = "%s"\nsocket = "%s"\n\n[[controller.lun]]\n%s\n' "$1" "$2" "$DIR/$1.sock" "$3"; }

# lv_hotplug NAME: once the guest's hotplug test waits, add LUN 1 of scsi0 with the CLI; the guest must see it
# (serial SGCI-LVHOT, 32 MiB) without a rescan. Returns when the guest waits for the LUN to go away.
lv_hotplug() {
    if bash "$HERE/wait-marker.sh" "$DIR/$1.console" SCSIGATE-HOTPLUG-READY 300 | sed "s/^/[libvirt $1] /"; then
        cli lun add scsi0 --lun 1 --backend file --path "$DIR/hot.img" --size 32M --create --serial SGCI-LVHOT >/dev/null
        check "libvirt vhost-user-scsi CLI lun add" $?
        bash "$HERE/wait-marker.sh" "$DIR/$1.console" SCSIGATE-HOTPLUG-WAIT-REMOVE 150 >/dev/null
    fi
    local line rc
    line=$(lv_show "$1" '^SCSIGATE-HOTPLUG-ADDED' | tail -1)
    [ -z "$line" ] || echo "$line"
    grep -q 'serial=SGCI-LVHOT bytes=33554432' <<<"$line"; rc=$?
    check "libvirt vhost-user-scsi guest sees the LUN added with the CLI (serial, 32 MiB) without a rescan" $rc
    return $rc
}

suite_libvirt() {
    DIR="$WORK/libvirt"; mkdir -p "$DIR"
    LV_PREFIX="scsigate-ci-$$-"
    local t0 v d
    t0=$(date +%s)
    v=$(bash "$ROOT/Deploy/libvirt/start-libvirtd.sh" --stop-file "$DIR/stop-libvirtd.sh")
    check "libvirt libvirtd running: $v" $? || return
    libvirt_domains
    for d in $(lv list --all --name | grep "^$LV_PREFIX"); do
        lv destroy "$d" >/dev/null 2>&1; lv undefine "$d" >/dev/null
        mv "/var/log/libvirt/qemu/$d.log" "$DIR/" 2>/dev/null
    done
    bash "$DIR/stop-libvirtd.sh"; check "libvirt daemons started by the suite stopped ($(head -1 "$DIR/stop-libvirtd.sh" | sed 's/.*(//; s/)//'))" $?
    echo "[libvirt] suite time $(( $(date +%s) - t0 )) s"
}

libvirt_domains() {
    local info blk scsi pv emu rc pv_ok
    info=$(bash "$HERE/build-initramfs.sh") || { check "libvirt test kernel and initramfs" 1; return; }
    eval "$info"   # KVER VMLINUZ MODULES INITRD
    blk="${LV_PREFIX}blk" scsi="${LV_PREFIX}scsi" pv="${LV_PREFIX}pvscsi"
    # one controller per transport, each with one 64 MiB file LUN; its socket is DIR/NAME.sock
    { gateway_header "$DIR"
      lv_controller blk0 vhost-user-blk "$(file_lun blk0.img 64M 'serial = "SGCI-LVBLK"')"
      lv_controller scsi0 vhost-user-scsi "lun = 0
$(file_lun scsi0.img 64M 'serial = "SGCI-LVSCSI"')"
      lv_controller pv0 pvscsi "target = 0
$(file_lun pv0.img 64M 'serial = "SGCI-LVPV"')"
    } > "$DIR/gw.toml"
    serve libvirt || return

    # virtio-blk (<disk type='vhostuser'> with <reconnect>, QEMU 7.2) and PVSCSI (vfio-user-pci needs QEMU >= 10.1:
    # sid's QEMU 11 through Tests/RealClients/chroot/qemu-sid.sh, which sees the kernel and initramfs through these binds;
    # DIR is under /var/tmp, visible anyway) run at the same time.
    lv_define vhost-user-blk "$blk" "$DIR/blk0.sock" multi \
        "scsigate.tests=smoke,pattern scsigate.expect_serial=SGCI-LVBLK scsigate.expect_size=67108864"
    check "libvirt vhost-user-blk domain defined" $?
    pv_ok=1
    if bash "$ROOT/Tests/RealClients/chroot/make-sid-chroot.sh" >/dev/null; then
        emu="$DIR/qemu-sid"
        printf '#!/bin/sh\nexec %q --ro-bind %q --ro-bind %q "$@"\n' "$ROOT/Tests/RealClients/chroot/qemu-sid.sh" \
            "$(dirname "$VMLINUZ")" "$(dirname "$INITRD")" > "$emu"
        chmod +x "$emu"
        lv_define pvscsi "$pv" "$DIR/pv0.sock" multi \
            "scsigate.tests=smoke,pattern scsigate.expect_serial=SGCI-LVPV scsigate.expect_size=67108864" "$emu"
        check "libvirt pvscsi domain defined (emulator: sid QEMU $("$emu" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9.]*\).*/\1/p'))" $?
        lv_start "$pv"; check "libvirt pvscsi domain started" $?
    else
        pv_ok=0; check "libvirt pvscsi: sid chroot with QEMU >= 10.1 (make-sid-chroot.sh)" 1
    fi
    lv_start "$blk"; check "libvirt vhost-user-blk domain started" $?
    lv_wait "$blk" 300; check "libvirt vhost-user-blk guest: virtio_blk disk with the LUN's serial and size, pattern written" $?
    lv_show "$blk" '^vda '
    grep -q 'vhost-user-blk-pci' "/var/log/libvirt/qemu/$blk.log" && grep -q 'reconnect=1' "/var/log/libvirt/qemu/$blk.log"
    check "libvirt vhost-user-blk QEMU command line has vhost-user-blk-pci on a chardev with reconnect=1" $?
    bash "$HERE/check-pattern.sh" "$DIR/$blk.console" "$DIR/blk0.img"; check "libvirt vhost-user-blk bytes identical in the backing file" $?
    if [ "$pv_ok" = 1 ]; then
        lv_wait "$pv" 400; check "libvirt pvscsi guest: vmw_pvscsi disk with the LUN's serial and size, pattern written" $?
        lv_show "$pv" '^sd[a-z] '
        bash "$HERE/check-pattern.sh" "$DIR/$pv.console" "$DIR/pv0.img"; check "libvirt pvscsi bytes identical in the backing file" $?
    fi

    # virtio-scsi: <qemu:commandline>; a LUN added with the CLI; virsh destroy; the same domain started again.
    lv_define vhost-user-scsi "$scsi" "$DIR/scsi0.sock" multi "scsigate.tests=smoke,hotplug scsigate.hotplug_wait=120"
    check "libvirt vhost-user-scsi domain defined" $?
    lv_start "$scsi"; check "libvirt vhost-user-scsi domain started" $?
    lv_hotplug "$scsi"
    lv_show "$scsi" '^sda ' | grep 'serial=SGCI-LVSCSI *bytes=67108864' >/dev/null
    check "libvirt vhost-user-scsi guest: virtio_scsi disk (LUN 0) with the LUN's serial and size" $?
    # destroyed while the guest runs (it waits for the hot-added LUN to go away): the gateway keeps serving
    lv destroy "$scsi" >/dev/null; check "libvirt virsh destroy of the running vhost-user-scsi domain" $?
    sleep 1
    kill -0 "$GW_PID" && cli controller list >/dev/null && [ "$(cli lun list scsi0 --json | grep -o '"serial"' | wc -l)" = 2 ]
    check "libvirt gateway still serving after virsh destroy (CLI answers, scsi0 lists both LUNs)" $?
    cli lun remove scsi0 --lun 1 >/dev/null; check "libvirt CLI lun remove with no guest attached" $?
    lv_start "$scsi"; check "libvirt vhost-user-scsi domain started a second time after the destroy" $?
    lv_hotplug "$scsi" && cli lun remove scsi0 --lun 1 >/dev/null
    lv_wait "$scsi" 200; check "libvirt vhost-user-scsi second start: LUN 0 seen, LUN 1 hot-added and removed, guest exits 0" $?
    lv_show "$scsi" '^SCSIGATE-HOTPLUG-REMOVED'

    stop_gateway; check "libvirt gateway drains and exits 0 on SIGTERM" $?
}
