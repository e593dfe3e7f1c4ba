# vfio-user-virtio: virtio-scsi and virtio-blk served as virtio-pci functions over vfio-user (transports
# vfio-user-virtio-scsi and vfio-user-virtio-blk), attached by QEMU 11 (sid chroot) with -device vfio-user-pci
# to a Linux guest with memfd shared RAM and its own virtio_pci, virtio_scsi and virtio_blk drivers. Checks what
# the guest sees: the PCI ids (1af4:1048, 1af4:1042), the virtio drivers bound, the SCSI addresses of LUNs 0
# and 2 (0:0:0:0, 0:0:0:2), sizes and serials (VPD 0x80, virtio-blk serial), fio randwrite+verify on the
# virtio-scsi and the virtio-blk disk, libiscsi's iscsi-test-cu SCSI suite on the virtio-scsi disk (<= MAXF
# failures, as the other SCSI suites), a guest pattern byte-identical in both backing files, the virtio-scsi
# controller's 2 request queues both used (2 vCPUs, reads pinned to each; blk-mq hw queues and per-queue stats);
# then a CLI hot-add of LUN 5 (at 0:0:0:5, one device after a rescan), its CLI removal (gone without a rescan),
# `scsigate stats` counting I/O on both controllers, and a CLI resize of the virtio-blk disk (the guest's size
# follows); then a guest with RAM without fd (vfio_user_virtio_plain_memory); the gateway exits 0 on SIGTERM.
suite_vfio_user_virtio() {
    DIR="$WORK/vfuvirtio"; mkdir -p "$DIR"
    local name=vfio-user-virtio glog="$DIR/guest.log" gpid rc line
    { gateway_header "$DIR"
      printf '\n[[controller]]\nname = "vsc0"\ntransport = "vfio-user-virtio-scsi"\nsocket = "%s"\nqueues = 2\n' "$DIR/vsc0.sock"
      printf '\n[[controller.lun]]\nlun = 0\n%s\n' "$(file_lun vsc0-l0.img 64M 'serial = "SGCI-VS0"')"
      printf '\n[[controller.lun]]\nlun = 2\n%s\n' "$(file_lun vsc0-l2.img 32M 'serial = "SGCI-VS2"')"
      printf '\n[[controller]]\nname = "vbk0"\ntransport = "vfio-user-virtio-blk"\nsocket = "%s"\n' "$DIR/vbk0.sock"
      printf '\n[[controller.lun]]\n%s\n' "$(file_lun vbk0.img 64M 'serial = "SGCI-VB0"')"
    } > "$DIR/gw.toml"
    serve "$name" || return
    guest_run --sid --quiet --smp 2 --test virtio-pci-disks --log "$glog" --timeout 900 --bind "$DIR" \
        --append "scsigate.hotplug_serial=SGCI-VS5 scsigate.size=16M scsigate.hotplug_wait=120 scsigate.pattern_mb=8" \
        -- -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$DIR/vsc0.sock\",\"type\":\"unix\"}}" \
           -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$DIR/vbk0.sock\",\"type\":\"unix\"}}" &
    gpid=$!
    if bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-VPCI-WAIT-HOTPLUG 720 >/dev/null; then
        cli lun add vsc0 --lun 5 --backend file --path "$DIR/vsc0-l5.img" --size 48M --create --serial SGCI-VS5 >/dev/null
        check "$name CLI lun add vsc0 --lun 5" $?
        if bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-VPCI-WAIT-REMOVE 200 >/dev/null; then
            cli lun remove vsc0 --lun 5 >/dev/null; check "$name CLI lun remove vsc0 --lun 5" $?
        fi
        if bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-VPCI-WAIT-RESIZE 200 >/dev/null; then
            cli stats --json > "$DIR/stats.json"; check "$name CLI stats" $?
            cli lun resize vbk0 --size 96M >/dev/null; check "$name CLI lun resize vbk0 --size 96M" $?
        fi
    fi
    wait $gpid; rc=$?
    grep -a '^SCSIGATE-PCI\|^SCSIGATE-DISK\|^SCSIGATE-FIO\|^SCSIGATE-CONFORMANCE\|^SCSIGATE-CUNIT-END\|^SCSIGATE-PATTERN\|^SCSIGATE-MQ\|^SCSIGATE-HOTPLUG\|^SCSIGATE-REMOVED\|^SCSIGATE-RESIZED\|FAIL' "$glog" \
        | tr -d '\r' | sed "s/^/[$name] /"
    # vf LINE-REGEX: the guest printed a line matching it (grep reads to the end: with pipefail, grep -q's early
    # exit would fail the check with tr's SIGPIPE, status 141, on a long log)
    vf() { tr -d '\r' < "$glog" | grep -aE "$1" >/dev/null; }
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
    conformance_check "$name" "$glog"
    # pattern_check DISK-PREFIX FILE WHAT: the guest's pattern on that disk is in FILE byte for byte
    pattern_check() {
        tr -d '\r' < "$glog" | grep -a "^SCSIGATE-PATTERN disk=$1" > "$DIR/pattern-$1.log"
        bash "$HERE/check-pattern.sh" "$DIR/pattern-$1.log" "$DIR/$2" | sed "s/^/[$name] /"
        check "$name bytes identical in the backing file of the $3" "${PIPESTATUS[0]}"
    }
    pattern_check sd vsc0-l0.img "virtio-scsi LUN 0"
    pattern_check vd vbk0.img "virtio-blk disk"
    vf '^SCSIGATE-MQ disk=sd[a-z]+ hw_queues=2 cpus=2$' && vf '^SCSIGATE-MQ-IO disk=sd[a-z]+ cpu=0 rc=0$' \
        && vf '^SCSIGATE-MQ-IO disk=sd[a-z]+ cpu=1 rc=0$'
    check "$name guest: virtio-scsi disk has 2 blk-mq hardware queues, direct reads from both CPUs" $?
    vf '^SCSIGATE-REMOVED disk=sd[a-z]+ '
    check "$name guest: CLI-removed LUN 5 disappears without a rescan" $?
    # stats taken before the resize: reads and writes counted on both controllers, commands on both
    # virtio-scsi request queues
    python3 - "$DIR/stats.json" <<'PY' | sed "s/^/[$name] /"
import json, sys
s = json.load(open(sys.argv[1]))
bad = 0
for c, want in (("vsc0", 2), ("vbk0", 1)):
    qs = sorted((q for q in s.get("queues", []) if q.get("controller") == c), key=lambda q: q.get("queue", 0))
    luns = [l for l in s.get("luns", []) if l.get("controller") == c]
    print("stats %s: luns %s; queues %s" % (c,
        ", ".join("%d: %d cmds %d reads %d writes" % (l.get("lun", 0), l.get("commands", 0), l.get("reads", 0), l.get("writes", 0)) for l in luns),
        ", ".join("%d: %d cmds" % (q.get("queue", 0), q.get("commands", 0)) for q in qs)))
    if len([q for q in qs if q.get("commands", 0) > 0]) < want or not any(l.get("reads", 0) > 0 and l.get("writes", 0) > 0 for l in luns):
        bad = 1
sys.exit(bad)
PY
    check "$name CLI stats: reads and writes on both controllers, commands on both virtio-scsi request queues" "${PIPESTATUS[0]}"
    vf '^SCSIGATE-RESIZED disk=vd[a-z]+ bytes=100663296 '
    check "$name guest: virtio-blk disk resized to 96 MiB by the config-change interrupt" $?
    check "$name guest test (fio, conformance, pattern, multiqueue, hotplug, removal, resize)" $rc
    vfio_user_virtio_plain_memory
    stop_gateway; check "$name gateway drains and exits 0 on SIGTERM" $?
}

# vfio_user_virtio_plain_memory: a second guest on the same gateway, with guest RAM without fd (plain -m): the
# rings run on the gateway's shadow copy, kept by DMA_READ/DMA_WRITE messages. fio randwrite+verify on the
# virtio-scsi LUN 0 disk and the virtio-blk disk (0 errors); the gateway's log shows both functions in that mode and
# the DMA messages they sent (its per-request figures).
vfio_user_virtio_plain_memory() {
    local name=vfio-user-virtio-plain-memory plog="$DIR/plain.log" from rc
    from=$(wc -l < "$DIR/gw.log")
    local args=(--sid --plain-memory --quiet --test fio-disks --log "$plog" --timeout 300 --bind "$DIR"
        --append "scsigate.disks=sda,vda scsigate.size=8M"
        -- -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$DIR/vsc0.sock\",\"type\":\"unix\"}}"
           -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$DIR/vbk0.sock\",\"type\":\"unix\"}}")
    guest_run "${args[@]}"; rc=$?
    tr -d '\r' < "$plog" | grep -a '^\[fio-verify\] fio\|^\[fio-disks\] disk' | sed "s/^/[$name] /"
    check "$name guest: fio randwrite+verify 4k/64k on the virtio-scsi and the virtio-blk disk, 0 errors" $rc
    tail -n +"$((from + 1))" "$DIR/gw.log" | grep -a 'guest RAM without fd: \|DMA by message so far' | sed "s/^.*controller=\\([^]]*\\)\\] [^:]*: /[$name] \\1: /"
    local c
    for c in vsc0 vbk0; do
        tail -n +"$((from + 1))" "$DIR/gw.log" | grep -a "controller=$c\]" | grep -a 'guest RAM has no fd: the rings run on a shadow' >/dev/null \
            && tail -n +"$((from + 1))" "$DIR/gw.log" | grep -a "controller=$c\]" | grep -aE 'guest RAM without fd: [1-9][0-9]* requests copied in \(0 refused\)' >/dev/null \
            && tail -n +"$((from + 1))" "$DIR/gw.log" | grep -a "controller=$c\]" | grep -aE 'DMA by message so far: [1-9][0-9]* reads, [1-9][0-9]* writes, 0 failed' >/dev/null
        check "$name $c ran its rings by DMA message (shadow mode, requests copied, DMA reads and writes, 0 failed)" $?
    done
    # SeaBIOS probes both disks first: it enables its request queue, sets DRIVER_OK and notifies while the enable
    # still waits for its DMA_READ; a notification dropped there hung the boot (found 2026-12-03).
    ! tail -n +"$((from + 1))" "$DIR/gw.log" | grep -a 'ignored notification'
    check "$name no notification dropped (SeaBIOS notifies during the queue enable's DMA wait)" $?
}
REGISTERED_SUITES+=(vfio-user-virtio)
