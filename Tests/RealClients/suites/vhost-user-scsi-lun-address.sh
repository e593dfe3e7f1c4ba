# vhost-user-scsi-lun-address: LUNs 2 (peripheral addressing in REPORT LUNS) and 300 (flat) hot-added with the
# CLI to a running QEMU 7.2 vhost-user-scsi-pci guest (Linux virtio_scsi): each must appear once, at the H:C:T:L
# Linux derives from REPORT LUNS (0:0:0:2 and 0:0:0:16684), still once after a full rescan of the host, and
# its removal event must remove that device. (Events that named LUN 2 flat, 0x4002, made Linux add 0:0:0:16386,
# and a rescan then added 0:0:0:2 as a second device for the same LUN.)
suite_vhost_user_scsi_lun_address() {
    DIR="$WORK/vlunaddr"; mkdir -p "$DIR"
    one_controller vlun0 vhost-user-scsi '' "lun = 0
$(file_lun lun0.img 64M 'serial = "SGCI-L0"')"
    serve vhost-user-scsi-lun-address || return
    local glog="$DIR/guest.log" gpid rc name=vhost-user-scsi-lun-address
    bash "$HERE/run-guest.sh" --quiet --test hotplug-luns --log "$glog" --timeout 600 \
        --append "scsigate.luns=2:SGCI-L2,300:SGCI-L300 scsigate.hotplug_wait=120" \
        -- -chardev "socket,id=c0,path=$DIR/vlun0.sock" -device vhost-user-scsi-pci,chardev=c0 &
    gpid=$!
    if bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-HOTLUNS-READY 300 >/dev/null; then
        cli lun add vlun0 --lun 2 --backend file --path "$DIR/l2.img" --size 32M --create --serial SGCI-L2 >/dev/null
        check "$name CLI lun add --lun 2" $?
        cli lun add vlun0 --lun 300 --backend file --path "$DIR/l300.img" --size 32M --create --serial SGCI-L300 >/dev/null
        check "$name CLI lun add --lun 300" $?
        if bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-HOTLUNS-WAIT-REMOVE 200 >/dev/null; then
            cli lun remove vlun0 --lun 2 >/dev/null; check "$name CLI lun remove --lun 2" $?
            cli lun remove vlun0 --lun 300 >/dev/null; check "$name CLI lun remove --lun 300" $?
        fi
    fi
    wait $gpid; rc=$?
    grep -a 'SCSIGATE-HOTLUN \|SCSIGATE-HOTLUNS-REMOVED\|FAIL' "$glog" | tr -d '\r' | sed "s/^/[$name] /"
    check "$name guest: LUNs 2 and 300 at the H:C:T:L REPORT LUNS gives, one device each after a rescan, removed by their events" $rc
    stop_gateway; check "$name gateway drains and exits 0 on SIGTERM" $?
}
REGISTERED_SUITES+=(vhost-user-scsi-lun-address)
