# Soak (sourced by ci.sh): one gateway serving all three transports to three guests at once, each running
# fio randwrite+verify (4 KiB and 64 KiB, crc32c) for SCSIGATE_SOAK_SECONDS (CI: 60), while the host adds and
# removes LUNs with the CLI (virtio-scsi LUN 7, PVSCSI target 5) and polls `scsigate stats`. The gateway's
# open fds and RSS are taken after a warm-up (a quarter of the run, at least 30 s: hotplug churn has run a few
# cycles, its threads and malloc arenas exist) and at the end (the last
# sample while all three guests still run, so their connections are counted both times): neither may
# grow more than 5 %, no verify error, no failed CLI call. Tests/RealClients/soak.sh SECONDS runs it alone.
#   virtio-scsi  vhost-user, QEMU 7.2 (host)      virtio-blk  vhost-user, QEMU 7.2 (host)
#   PVSCSI       vfio-user, QEMU 11 (sid chroot)

# The RSS compared is RssAnon, the gateway's private memory: VmRSS also counts the guests' shared RAM pages the
# gateway has touched (I/O buffers through the memory table), which grows as the guests' page caches move around
# and is not the gateway's to leak. VmRSS and RssShmem are printed beside it.
soak_fd_rss() { echo "$(ls "/proc/$GW_PID/fd" | wc -l) $(awk '/RssAnon/ {print $2}' "/proc/$GW_PID/status")"; }
soak_rss_detail() { awk '/VmRSS|RssAnon|RssShmem/ {printf "%s %s kB  ", $1, $2}' "/proc/$GW_PID/status"; }

soak_run() {  # soak_run SECONDS
    local secs=$1
    DIR="$WORK/soak"; mkdir -p "$DIR"
    { gateway_header "$DIR"; cat <<TOML

[[controller]]
name = "soakscsi"
transport = "vhost-user-scsi"
socket = "$DIR/soakscsi.sock"
queues = 2

[[controller.lun]]
lun = 0
$(file_lun soak-scsi.img 128M 'serial = "SGCI-SOAK-VS"')

[[controller]]
name = "soakblk"
transport = "vhost-user-blk"
socket = "$DIR/soakblk.sock"

[[controller.lun]]
$(file_lun soak-blk.img 128M 'serial = "SGCI-SOAK-VB"')

[[controller]]
name = "soakpv"
transport = "pvscsi"
socket = "$DIR/soakpv.sock"

[[controller.lun]]
target = 0
$(file_lun soak-pv.img 128M 'serial = "SGCI-SOAK-PV"')
TOML
    } > "$DIR/gw.toml"
    serve soak || return
    # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can fail and panic the boot
    # ("IO-APIC + timer doesn't work", seen with three guests booting at once).
    local fio="scsigate.runtime=$secs scsigate.size=32M scsigate.bs=4k,64k scsigate.iodepth=8 no_timer_check"
    local t0 timeout=$((secs + 900)) pids=() names=(virtio-scsi virtio-blk pvscsi) i
    t0=$(date +%s)
    bash "$HERE/run-guest.sh" --quiet --test fio-verify --log "$DIR/vscsi.log" --timeout "$timeout" \
        --append "scsigate.vendor=SCSIGATE $fio" \
        -- -chardev "socket,id=c0,path=$DIR/soakscsi.sock" -device vhost-user-scsi-pci,chardev=c0,num_queues=2 &
    pids+=($!)
    bash "$HERE/run-guest.sh" --quiet --test fio-verify --log "$DIR/vblk.log" --timeout "$timeout" \
        --append "$fio" -- -chardev "socket,id=c1,path=$DIR/soakblk.sock" -device vhost-user-blk-pci,chardev=c1 &
    pids+=($!)
    bash "$HERE/run-guest.sh" --sid --bind "$DIR" --quiet --test fio-verify --log "$DIR/pv.log" --timeout "$timeout" \
        --append "scsigate.vendor=SCSIGATE $fio" \
        -- -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$DIR/soakpv.sock\",\"type\":\"unix\"}}" &
    pids+=($!)
    # Wait until every guest started fio (or ended: a guest that died early must not hold the run up).
    local started=0 logs=(vscsi vblk pv) deadline=$(( $(date +%s) + 600 ))
    for i in 0 1 2; do
        while ! grep -aq '\[fio-verify\] disk' "$DIR/${logs[$i]}.log" 2>/dev/null; do
            kill -0 "${pids[$i]}" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ] || break
            sleep 2
        done
        grep -aq '\[fio-verify\] disk' "$DIR/${logs[$i]}.log" 2>/dev/null && started=$((started + 1))
    done
    check "soak: all three guests started fio verify" $([ "$started" = 3 ]; echo $?)
    local warm=$((secs / 4)); [ "$warm" -ge 30 ] || warm=30
    local churn=0 churn_bad=0 polls=0 polls_bad=0 measured="" last="" last_detail="" now next_stats=0 next_churn=0 k=0
    local start_io
    start_io=$(date +%s)
    while :; do
        local alive=0 p
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
        [ "$alive" -gt 0 ] || break
        now=$(date +%s)
        if [ -z "$measured" ] && [ $((now - start_io)) -ge "$warm" ]; then
            measured=$(soak_fd_rss)
            echo "[soak] after ${warm}s warm-up: fds ${measured% *}, RssAnon ${measured#* } KiB ($(soak_rss_detail))"
        elif [ -n "$measured" ] && [ "$alive" = 3 ]; then
            last=$(soak_fd_rss)  # the end figure: the last one taken while all three guests still ran
            last_detail=$(soak_rss_detail)
        fi
        if [ "$now" -ge "$next_stats" ]; then
            polls=$((polls + 1)); cli stats >/dev/null 2>&1 || polls_bad=$((polls_bad + 1))
            next_stats=$((now + 2))
        fi
        if [ "$now" -ge "$next_churn" ]; then
            k=$((k + 1))
            if [ $((k % 2)) = 0 ]; then
                cli lun add soakscsi --lun 7 --backend null --size 16M >/dev/null 2>&1 && sleep 1 \
                    && cli lun remove soakscsi --lun 7 >/dev/null 2>&1 || churn_bad=$((churn_bad + 1))
            else
                cli lun add soakpv --target 5 --backend file --path "$DIR/soak-churn.img" --size 16M --create >/dev/null 2>&1 && sleep 1 \
                    && cli lun remove soakpv --target 5 >/dev/null 2>&1 || churn_bad=$((churn_bad + 1))
            fi
            churn=$((churn + 1))
            next_churn=$((now + 4))
        fi
        sleep 1
    done
    local rcs=() rc all_ok=0
    for i in 0 1 2; do
        wait "${pids[$i]}"; rc=$?; rcs+=("$rc")
        [ "$rc" = 0 ] || all_ok=1
    done
    local end=$last
    [ -n "$end" ] || end=$(soak_fd_rss)
    echo "[soak] ran $(( $(date +%s) - t0 ))s (fio ${secs}s per guest); guests rc ${rcs[*]} (${names[*]})"
    for log in vscsi vblk pv; do
        grep -a 'fio-verify: [0-9]* passed' "$DIR/$log.log" | tail -1 | tr -d '\r' | sed "s/^/[soak] $log: /"
    done
    echo "[soak] hotplug churn: $churn add+remove pairs, $churn_bad failed; stats polls: $polls, $polls_bad failed"
    check "soak: fio verify without error on virtio-scsi, virtio-blk and PVSCSI" $all_ok
    [ "$churn_bad" = 0 ] && [ "$polls_bad" = 0 ]; check "soak: every CLI hotplug and stats call succeeded" $?
    if [ -n "$measured" ]; then
        local fd0=${measured% *} rss0=${measured#* } fd1=${end% *} rss1=${end#* }
        echo "[soak] fds $fd0 -> $fd1, RssAnon $rss0 -> $rss1 KiB (after warm-up -> last sample with all three guests running; then $last_detail)"
        [ "$fd1" -le $((fd0 + fd0 / 20)) ]; check "soak: gateway fds within 5 % of the warm-up value" $?
        [ "$rss1" -le $((rss0 + rss0 / 20)) ]; check "soak: gateway private RSS (RssAnon) within 5 % of the warm-up value" $?
    else
        check "soak: warm-up measurement taken (the guests ended before ${warm}s)" 1
    fi
    stop_gateway; check "soak: gateway drains and exits 0 on SIGTERM" $?
}

suite_soak() { soak_run "${SCSIGATE_SOAK_SECONDS:-60}"; }
REGISTERED_SUITES+=(soak)
