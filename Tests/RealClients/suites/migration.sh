# shellcheck shell=bash
# Suite "migration" (sourced by ci.sh): live migration of a guest whose disks are on ScsiGate, between
# QEMU 7.2 processes on this host. One gateway serves a vhost-user-scsi and a vhost-user-blk controller;
# the guest (tests/migration.sh) runs fio randwrite + verify_backlog on both disks for 70 s and is
# migrated 15 s in (hop 1: QEMU A -> B); then it verifies what it wrote, read-only, and is migrated again
# during that phase (hop 2: B -> C), which catches data-in pages the dirty log missed. Each destination
# starts with the same disk arguments plus -incoming, connects to the same controller sockets while the
# source is still attached, and takes the rings over when the source stopped them. The guest's console
# follows it: each QEMU writes its own console log, and the guest's result comes from the last one.

# mig_hmp PORT COMMAND: one monitor command (QEMU run with -monitor tcp:127.0.0.1:PORT,server,nowait).
mig_hmp() { bash "$HERE/qemu-hmp.sh" "$1" "$2"; }

# mig_hop NAME SRC_PORT SRC_PID INCOMING: migrates the QEMU on SRC_PORT (its run-guest.sh: SRC_PID) to the
# one waiting on INCOMING; prints the figures of `info migrate`, quits the source. Returns 0 when the
# migration completed.
mig_hop() {
    local name=$1 src=$2 pid=$3 incoming=$4 out status="" i
    for i in $(seq 1 600); do [ -S "$incoming" ] && break; sleep 0.5; done
    [ -S "$incoming" ] || { echo "[migration] $name: the destination never listened on $incoming"; return 1; }
    mig_hmp "$src" "migrate_set_parameter max-bandwidth 1G" >/dev/null
    mig_hmp "$src" "migrate -d unix:$incoming" | sed "s/^/[migration] $name: /"
    for i in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || { echo "[migration] $name: the source QEMU ended"; return 1; }
        out=$(mig_hmp "$src" "info migrate")
        # QEMU 7.2 prints "Migration status: completed", QEMU 11 "Status: completed".
        status=$(printf '%s\n' "$out" | sed -n 's/^\(Migration status\|Status\):[[:space:]]*//p' | head -1 | cut -d' ' -f1)
        case $status in completed|failed|cancelled) break ;; esac
    done
    printf '%s\n' "$out" | grep -E 'Migration status|total time|downtime|transferred ram|dirty sync count|setup|^Status|Time \(ms\)|Transfers|dirty_syncs' \
        | sed "s/^/[migration] $name: /"
    grep -a 'hand-over\|takes over\|migration successor\|refused' "$DIR/gw.log" | sed "s/^/[migration] gateway: /" | tail -4
    mig_hmp "$src" "quit" >/dev/null
    [ "$status" = completed ]
}

# mig_unit_attentions: UNIT ATTENTION completions the virtio-scsi controller counted so far.
mig_unit_attentions() {
    cli stats mscsi0 --json | grep -o '"UNIT ATTENTION" *: *[0-9]*' | grep -o '[0-9]*$' | awk '{ s += $1 } END { print s + 0 }'
}

suite_migration() {
    DIR="$WORK/migration"; mkdir -p "$DIR"
    { gateway_header "$DIR"
      printf '\n[[controller]]\nname = "mscsi0"\ntransport = "vhost-user-scsi"\nsocket = "%s"\n\n[[controller.lun]]\nlun = 0\n%s\n' \
          "$DIR/mscsi0.sock" "$(file_lun mscsi0.img 64M)"
      printf '\n[[controller]]\nname = "mblk0"\ntransport = "vhost-user-blk"\nsocket = "%s"\n\n[[controller.lun]]\nlun = 0\n%s\n' \
          "$DIR/mblk0.sock" "$(file_lun mblk0.img 64M)"
    } > "$DIR/gw.toml"
    serve migration || return
    local disks=(-chardev "socket,id=c0,path=$DIR/mscsi0.sock" -device vhost-user-scsi-pci,chardev=c0,num_queues=1
                 -chardev "socket,id=c1,path=$DIR/mblk0.sock" -device vhost-user-blk-pci,chardev=c1,num-queues=1,packed=on)
    local guest=(--quiet --test migration --memory 512 --timeout 600 --append "scsigate.runtime=70 scsigate.verify_runtime=40")
    local port=$((20000 + RANDOM % 20000)) pa pb pc rc ua attempt
    for attempt in 1 2; do
        bash "$HERE/run-guest.sh" "${guest[@]}" --log "$DIR/qemu-a.log" -- "${disks[@]}" -monitor "tcp:127.0.0.1:$port,server,nowait" &
        pa=$!
        bash "$HERE/wait-marker.sh" "$DIR/qemu-a.log" "SCSIGATE-MIGRATION phase=write" 300 >/dev/null && break
        mig_hmp "$port" quit >/dev/null; wait "$pa"
        # A guest kernel panic before its init ran is retried once, as guest_run does.
        if [ "$attempt" = 1 ] && tr -d '\r' < "$DIR/qemu-a.log" | grep -a 'Kernel panic' >/dev/null \
            && ! tr -d '\r' < "$DIR/qemu-a.log" | grep -a '^scsigate-guest: kernel' >/dev/null; then
            RETRIES=$((RETRIES + 1))
            echo "real-client: RETRY: the guest kernel panicked before its init ran (log kept as $DIR/qemu-a.log.stalled)"
            mv "$DIR/qemu-a.log" "$DIR/qemu-a.log.stalled"
            continue
        fi
        check "migration guest started fio" 1; stop_gateway; return
    done
    ua=$(mig_unit_attentions)
    # The destination starts at once (QEMU's start-up takes a while on a loaded machine) and waits for the stream.
    bash "$HERE/run-guest.sh" "${guest[@]}" --log "$DIR/qemu-b.log" -- "${disks[@]}" \
        -monitor "tcp:127.0.0.1:$((port + 1)),server,nowait" -incoming "unix:$DIR/incoming-b.sock" &
    pb=$!
    sleep 15
    # Hop 1, 15 s into randwrite + verify_backlog on both disks.
    if ! mig_hop "hop 1 (randwrite+verify)" "$port" "$pa" "$DIR/incoming-b.sock"; then
        check "migration hop 1 completed during randwrite+verify_backlog" 1
        mig_hmp "$((port + 1))" quit >/dev/null; wait "$pa"; wait "$pb"; stop_gateway; return
    fi
    check "migration hop 1 completed during randwrite+verify_backlog" 0
    wait "$pa"
    # Hop 2, during the read-only verify phase (the guest's console is now in qemu-b.log).
    bash "$HERE/run-guest.sh" "${guest[@]}" --log "$DIR/qemu-c.log" -- "${disks[@]}" \
        -monitor "tcp:127.0.0.1:$((port + 2)),server,nowait" -incoming "unix:$DIR/incoming-c.sock" &
    pc=$!
    if bash "$HERE/wait-marker.sh" "$DIR/qemu-b.log" "SCSIGATE-MIGRATION phase=verify" 300 >/dev/null; then
        sleep 5
        if mig_hop "hop 2 (read-only verify)" "$((port + 1))" "$pb" "$DIR/incoming-c.sock"; then
            check "migration hop 2 completed during the read-only verify" 0
        else
            check "migration hop 2 completed during the read-only verify" 1; mig_hmp "$((port + 2))" quit >/dev/null
        fi
    else
        check "migration guest reached the read-only verify on the first destination" 1
        mig_hmp "$((port + 1))" quit >/dev/null
        mig_hmp "$((port + 2))" quit >/dev/null
    fi
    wait "$pb"
    wait "$pc"; rc=$?
    tr -d '\r' < "$DIR/qemu-b.log" | grep -a '^\[migration\]' | sed 's/^/[migration] guest on B: /'
    tr -d '\r' < "$DIR/qemu-c.log" | grep -a '^\[migration\]' | sed 's/^/[migration] guest on C: /'
    check "migration fio on both disks finished on the last destination with 0 errors and 0 verify failures" $rc
    [ "$(grep -c 'takes over the device' "$DIR/gw.log")" -ge 4 ]
    check "migration gateway handed both controllers over twice" $?
    [ "$(mig_unit_attentions)" = "$ua" ]
    check "migration no UNIT ATTENTION after the hand-overs (virtio-scsi count stays $ua)" $?
    ! grep -a 'refused\|abandoned\|broken' "$DIR/gw.log"
    check "migration gateway refused nothing, abandoned nothing" $?
    stop_gateway; check "migration gateway drains and exits 0 on SIGTERM" $?
}
REGISTERED_SUITES+=(migration)
