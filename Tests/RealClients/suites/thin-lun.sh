# thin-lun: thin file LUNs whose host filesystem (a 4 MiB tmpfs each) fills under a virtio-scsi guest's
# writes (guest test tests/thin-lun.sh). LUN 0 reports at once (DATA PROTECT 27h/07h in the guest, data
# before intact, writes work again once the host frees space); LUN 1 holds the writes
# (out_of_space = "hold") until the host frees space, and the guest's dd ends without an error.
thin_free_when() {  # thin_free_when LOG MARKER FILE [WAIT-FOR-HOLD]: delete FILE once MARKER appears
    bash "$HERE/wait-marker.sh" "$1" "$2" 600 | sed "s/^/[thin-lun] /" || return 1
    if [ -n "${4:-}" ]; then
        local n
        for n in $(seq 1 60); do grep -q "out of space: holding writes" "$DIR/gw.log" && break; sleep 0.5; done
        grep -q "out of space: holding writes" "$DIR/gw.log"; check "thin-lun gateway holds the write that found no space" $?
        sleep 3
        echo "[thin-lun] held for 3 s: $(cli stats --json | python3 -c 'import json,sys; l=[x for x in json.load(sys.stdin)["luns"] if x["lun"]==1][0]; print("space_held_now", l["space_held_now"], "space_held_writes", l["space_held_writes"])')"
    fi
    rm -f "$3"; echo "[thin-lun] freed space: removed $3"
}

suite_thin_lun() {
    DIR="$WORK/thin"; mkdir -p "$DIR/report" "$DIR/hold"
    if ! { mount -t tmpfs -o size=4m scsigate-thin "$DIR/report" && mount -t tmpfs -o size=4m scsigate-thin "$DIR/hold"; }; then
        check "thin-lun two 4 MiB tmpfs mounted" 1; return
    fi
    head -c 2097152 /dev/zero > "$DIR/report/ballast"; head -c 2097152 /dev/zero > "$DIR/hold/ballast"
    { gateway_header "$DIR"
      printf '\n[[controller]]\nname = "thin0"\ntransport = "vhost-user-scsi"\nsocket = "%s"\n' "$DIR/thin0.sock"
      printf '\n[[controller.lun]]\nlun = 0\n%s\n' "$(file_lun report/lun.img 64M $'cache = "writeback"\nserial = "SGTHIN-REPORT"')"
      printf '\n[[controller.lun]]\nlun = 1\n%s\n' "$(file_lun hold/lun.img 64M $'cache = "writeback"\nserial = "SGTHIN-HOLD"\nout_of_space = "hold"\nout_of_space_hold = 120')"
    } > "$DIR/gw.toml"
    if serve thin-lun; then
        local glog="$DIR/guest.log" gpid rc
        guest_run --quiet --test thin-lun --log "$glog" --timeout 600 \
            -- -chardev "socket,id=c0,path=$DIR/thin0.sock" -device vhost-user-scsi-pci,chardev=c0 &
        gpid=$!
        thin_free_when "$glog" SCSIGATE-THIN-FULL "$DIR/report/ballast"
        thin_free_when "$glog" SCSIGATE-THIN-HOLDING "$DIR/hold/ballast" hold
        wait $gpid; rc=$?
        grep -a "^\[thin-lun\]" "$glog" | tr -d '\r'
        check "thin-lun guest: 27h/07h at once, data intact, writes again after freeing; held write completes" $rc
        local stats
        stats=$(cli stats --json | python3 -c 'import json,sys; l=[x for x in json.load(sys.stdin)["luns"] if x["lun"]==1][0]; print(l["space_held_writes"], l["space_resumed_writes"], l["space_failed_writes"])')
        echo "[thin-lun] hold LUN stats: held resumed failed = $stats"
        [ "$(echo "$stats" | cut -d' ' -f2)" -ge 1 ] && [ "$(echo "$stats" | cut -d' ' -f3)" = 0 ]
        check "thin-lun stats count the held writes as resumed, none failed" $?
        grep -q "space available again" "$DIR/gw.log"; check "thin-lun gateway logs the space coming back" $?
        stop_gateway; check "thin-lun gateway drains and exits 0 on SIGTERM" $?
    fi
    umount "$DIR/report" "$DIR/hold"
}
REGISTERED_SUITES+=(thin-lun)
