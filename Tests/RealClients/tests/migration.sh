#!/bin/sh
# migration: fio with crc32c verify on two disks at once while the host migrates the guest between QEMU
# processes (Tests/RealClients/suites/migration.sh drives the migrations; this script only prints markers).
#   phase 1: randwrite + verify_backlog (reads verify while writes go on) on every disk for
#            scsigate.runtime seconds (default 70); prints "SCSIGATE-MIGRATION phase=write" when fio starts
#   phase 2: read-only verify of what phase 1 left (fio --verify_only, repeated) for scsigate.verify_runtime
#            seconds (default 40); prints "SCSIGATE-MIGRATION phase=verify" when it starts. Every page the
#            device writes (data-in) must reach the destination: an unlogged page fails the verify.
#   scsigate.disks=LIST  disks (default: every sd and vd disk)   scsigate.size=SIZE per disk (default 48M)
# Exit 0 when every fio run ended with err=0 and no verify failure.
. /tests/lib/common.sh
wait_for_disks || exit 1
disks=$(echo "${SCSIGATE_DISKS:-$(list_disks | tr '\n' ',')}" | tr ',' ' ')
size=${SCSIGATE_SIZE:-48M}
runtime=${SCSIGATE_RUNTIME:-70}
vruntime=${SCSIGATE_VERIFY_RUNTIME:-40}
log "disks: $disks size=$size runtime=${runtime}s verify=${vruntime}s"
uptime_s() { cut -d' ' -f1 /proc/uptime | cut -d. -f1; }

# job_args DISK: the job definition both phases share (verify_only needs the same one).
job_args() {
    echo "--name=mig-$1 --filename=/dev/$1 --ioengine=libaio --direct=1 --bs=4k --iodepth=8 --size=$size" \
         "--verify=crc32c --verify_fatal=1 --verify_dump=0 --randseed=4242"
}

fail=0
# check NAME LOGFILE RC: err=0 on every job and no verify complaint.
check() {
    local errs bad
    errs=$(grep -o 'err= *[0-9]*' "$2" | tr -d ' ' | grep -vc '^err=0$')
    bad=$(grep -c -i 'verify: bad\|bad magic\|crc32c: verify failed\|io_u error\|verify failed' "$2")
    if [ "$3" = 0 ] && [ "$errs" = 0 ] && [ "$bad" = 0 ] && grep -q 'err= *0' "$2"; then
        log "$1: PASS (fio rc=$3, verify errors $bad)"
    else
        log "$1: FAIL (fio rc=$3, jobs with errors $errs, verify errors $bad)"; fail=$((fail + 1))
    fi
}

echo "SCSIGATE-MIGRATION phase=write uptime=$(uptime_s)"
pids=""
for d in $disks; do
    # shellcheck disable=SC2046
    fio $(job_args "$d") --rw=randwrite --verify_backlog=64 --time_based=1 --runtime="$runtime" \
        > "/tmp/write-$d.log" 2>&1 &
    pids="$pids $!:$d"
done
for p in $pids; do wait "${p%%:*}"; rc=$?; d=${p#*:}; cat "/tmp/write-$d.log"; check "randwrite+verify_backlog $d" "/tmp/write-$d.log" $rc; done

# Phase 2 writes the whole range once (sequential, with verify headers), then only reads it back.
for d in $disks; do
    # shellcheck disable=SC2046
    fio $(job_args "$d") --rw=write --do_verify=0 > "/tmp/fill-$d.log" 2>&1 || { cat "/tmp/fill-$d.log"; fail=$((fail + 1)); }
done
echo "SCSIGATE-MIGRATION phase=verify uptime=$(uptime_s)"
t0=$(uptime_s) rounds=0
while :; do
    rounds=$((rounds + 1)) pids=""
    for d in $disks; do
        # shellcheck disable=SC2046
        fio $(job_args "$d") --rw=write --verify_only=1 > "/tmp/verify-$d.log" 2>&1 &
        pids="$pids $!:$d"
    done
    for p in $pids; do
        wait "${p%%:*}"; rc=$?; d=${p#*:}
        check "read-only verify round $rounds $d" "/tmp/verify-$d.log" $rc
        [ "$rc" = 0 ] || cat "/tmp/verify-$d.log"
    done
    [ $fail = 0 ] && [ $(( $(uptime_s) - t0 )) -lt "$vruntime" ] || break
done
log "migration: $rounds verify rounds, $fail failed"
echo "SCSIGATE-MIGRATION phase=done uptime=$(uptime_s)"
[ $fail = 0 ]
