# vhost-user-scsi-reconnect: the gateway is SIGKILLed twice during a guest fio randwrite+verify on a
# vhost-user-scsi disk and restarted each time; QEMU 11 (sid chroot; vhost-user-scsi reconnect needs QEMU >= 8.2,
# chardev reconnect-ms=1000) reconnects and hands over the in-flight region; fio must end with 0 errors.
#   split rings: meanwhile the guest sends LOGICAL UNIT RESETs in a loop to a second LUN (TMFs on the control
#                queue), and the second kill races a CLI `lun add` of LUN 2, which the operator repeats after the
#                restart (a LUN added at run time is not in the config): the guest must end with one device for it
#   packed rings (packed=on): LUN 0 is an iSCSI LUN of tgtd, stopped (SIGSTOP) 1 s before the first kill and
#                resumed after it: the requests fio has queued are in flight when the gateway dies and must be
#                resubmitted by the next one (counted, > 0); the second kill comes without the stall.
#                With nothing in flight QEMU cannot tell a new gateway where a packed ring stood: the in-flight
#                region must (the guest hung before that was fixed)
# The requests resubmitted from the in-flight region at each restart are counted per ring.

# resubmitted NAME: per restart, the requests each ring resubmitted from the in-flight region
resubmitted() {
    local k f line
    for k in 1 2; do
        f="$DIR/gw-$1-$k.log"
        [ -f "$f" ] || continue
        line=$(grep -o 'ring [0-9]*: resubmitting [0-9]* in-flight' "$f" | sed 's/ in-flight//; s/resubmitting //' | tr '\n' ' ')
        echo "[$1] restart $k resubmitted from the in-flight region: ${line:-nothing} (ring 0 = control queue, 2 = requests)"
    done
}

# hotplug_race K STAGE: kill 2 races `lun add --lun 2`; after that restart the LUN is added again (the new
# gateway started from the config, which does not have it).
hotplug_race() {
    [ "$1" = 2 ] || return 0
    case $2 in
        before-kill)
            cli lun add vrc0 --lun 2 --backend file --path "$DIR/l2.img" --size 32M --create --serial SGCI-RC2 >"$DIR/race-add.out" 2>&1 &
            RACE_PID=$!
            sleep 0.05 ;;
        after-restart)
            wait "$RACE_PID"; echo "[vhost-user-scsi-reconnect] lun add racing kill 2: exit $? ($(head -c 120 "$DIR/race-add.out" | tr '\n' ' '))"
            cli lun add vrc0 --lun 2 --backend file --path "$DIR/l2.img" --size 32M --create --serial SGCI-RC2 >/dev/null
            check "vhost-user-scsi-reconnect CLI lun add --lun 2 again after the restart" $? ;;
    esac
}

# stall_backend K STAGE: tgtd stopped for the second before kill 1 (once fio's writes flow: its start-up takes
# seconds on a loaded host), resumed right after it
stall_backend() {
    [ "$1" = 1 ] || return 0
    local i
    case $2 in
        before-kill)
            for i in $(seq 1 60); do
                [ "$(cli stats vrc0 2>/dev/null | awk '$1 == "vrc0" && $3 == 0 {print $6; exit}')" -gt 100 ] 2>/dev/null && break
                sleep 0.5
            done
            kill -STOP "$(cat "$DIR/tgt/tgtd.pid")"; sleep 1 ;;
        after-kill) kill -CONT "$(cat "$DIR/tgt/tgtd.pid")" ;;
    esac
}

# reconnect_run NAME DEVICE-OPTIONS APPEND [HOOK]: a guest fio verify on LUN 0 across two kills
reconnect_run() {
    local name=$1 devopts=$2 append=$3 hook=${4:-} glog="$DIR/$1.log" gpid rc
    bash "$HERE/run-guest.sh" --sid --bind "$DIR" --quiet --test reconnect --log "$glog" --timeout 900 \
        --append "scsigate.disk_serial=SGCI-RC0 scsigate.size=64M scsigate.bs=4k scsigate.runtime=25 $append" \
        -- -chardev "socket,id=c0,path=$DIR/vrc0.sock,reconnect-ms=1000" -device "vhost-user-scsi-pci,chardev=c0$devopts" &
    gpid=$!
    RESTARTED=0
    if bash "$HERE/wait-marker.sh" "$glog" '\[fio-verify\] disk' 300 >/dev/null; then
        kill_and_restart "$name" "$gpid" 2 4 "$DIR/gw-$name-" "$hook"
    fi
    [ "$RESTARTED" = 2 ]; check "$name gateway killed and restarted twice during fio ($RESTARTED)" $?
    wait $gpid; rc=$?
    grep -a "fio 4k\|fio-verify: \|SCSIGATE-TMF\|SCSIGATE-DISK" "$glog" | tr -d '\r' | sed "s/^/[$name] /"
    check "$name guest fio verify across the kills (0 errors)" $rc
    resubmitted "$name"
}

suite_vhost_user_scsi_reconnect() {
    DIR="$WORK/vscsirc"; mkdir -p "$DIR"
    one_controller vrc0 vhost-user-scsi '' "lun = 0
$(file_lun lun0.img 256M 'serial = "SGCI-RC0"')

[[controller.lun]]
lun = 1
$(file_lun lun1.img 64M 'serial = "SGCI-RC1"')"
    local name=vhost-user-scsi-reconnect
    serve "$name" || return
    reconnect_run "$name" "" "scsigate.tmf_serial=SGCI-RC1 scsigate.hotplug_serial=SGCI-RC2" hotplug_race
    grep -a 'SCSIGATE-TMF' "$DIR/$name.log" | tr -d '\r' | grep 'logical_unit_resets=[1-9]' >/dev/null
    check "$name guest LOGICAL UNIT RESETs completed during the kills" $?
    [ "$(grep -a 'SCSIGATE-DISK.*serial=SGCI-RC2' "$DIR/$name.log" | tr -d '\r' | grep -c 'hctl=[0-9]*:0:0:2')" = 1 ] \
        && [ "$(grep -ac 'SCSIGATE-DISK.*serial=SGCI-RC2' "$DIR/$name.log")" = 1 ]
    check "$name LUN 2 (added around kill 2, again after the restart): one device, at LUN 2" $?
    stop_gateway; check "$name gateway drains and exits 0 on SIGTERM" $?
    # packed rings, LUN 0 on tgtd (stalled at the first kill)
    local out url
    out=$(bash "$HERE/tgt/tgtd.sh" serve "$DIR/tgt" $((20000 + RANDOM % 20000)) $((200 + RANDOM % 700)) \
        iqn.2026-12.org.scsigate:reconnect "$DIR/tgt-lun.img" 256M)
    check "$name-packed tgtd start" $? || return
    url=$(printf '%s\n' "$out" | sed -n 's/^TGT_URL=//p')
    one_controller vrc0 vhost-user-scsi '' "lun = 0
backend = \"iscsi\"
url = \"$url\"
serial = \"SGCI-RC0\""
    if serve "$name-packed"; then
        reconnect_run "$name-packed" ",packed=on" "" stall_backend
        grep -q "packed rings" "$DIR"/gw-"$name"-packed-1.log; check "$name-packed the reconnected rings are packed" $?
        grep -q 'ring 2: resubmitting [1-9]' "$DIR/gw-$name-packed-1.log"
        check "$name-packed requests in flight at kill 1 (tgtd stalled) resubmitted by the restarted gateway" $?
        stop_gateway; check "$name-packed gateway drains and exits 0 on SIGTERM" $?
    fi
    bash "$HERE/tgt/tgtd.sh" stop "$DIR/tgt" >/dev/null 2>&1
}
REGISTERED_SUITES+=(vhost-user-scsi-reconnect)
