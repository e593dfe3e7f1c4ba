#!/bin/sh
# conformance: libiscsi's iscsi-test-cu over SG_IO on the selected SCSI disk.
#   scsigate.cu_tests=REGEX      test selection (default SCSI)
#   scsigate.cu_skip=PAT,...     leave out tests whose Suite.Test matches a shell pattern
#                                (PAT or PAT.*), e.g. CompareAndWrite,*.Miscompare; they are
#                                listed as excluded, never counted as passed
#   scsigate.cu_max_failed=N     exit 1 when more than N tests fail (default: report only)
#   scsigate.cu_timeout=SECS     kill iscsi-test-cu after SECS (exit 124, partial log kept)
# The CUnit output (verbose: one line per test) and its Run Summary table go to the console;
# Tests/RealClients/summarize-cunit.sh extracts the counts from the console log.
. /tests/lib/common.sh
wait_for_disks || exit 1
d=$(find_disk) || exit 1
sg=$(disk_sg "$d") || { log "$d is not a SCSI disk (no sg node): conformance needs SCSI"; exit 1; }
log "disk $d /dev/$sg vendor=$(disk_vendor "$d") model=$(disk_model "$d") bytes=$(disk_bytes "$d")"
echo "== sg_inq /dev/$sg"; sg_inq "/dev/$sg" 2>&1
echo "== sg_readcap -l /dev/$sg"; sg_readcap -l "/dev/$sg" 2>&1
tests=${SCSIGATE_CU_TESTS:-SCSI}
if [ -n "${SCSIGATE_CU_SKIP:-}" ]; then
    # expand the selection into a list file without the skipped tests
    : > /tmp/cu-tests.lst
    iscsi-test-cu -l | awk -F. 'NF == 3' | while read -r t; do
        sel=0
        for pat in $(echo "$tests" | tr ',' ' '); do
            case $t in $pat|$pat.*) sel=1 ;; esac
        done
        [ $sel = 1 ] || continue
        st=${t#*.}
        for pat in $(echo "$SCSIGATE_CU_SKIP" | tr ',' ' '); do
            case $st in $pat|$pat.*) echo "SCSIGATE-CUNIT-EXCLUDED: $st"; continue 2 ;; esac
        done
        echo "$t" >> /tmp/cu-tests.lst
    done
    log "$(wc -l < /tmp/cu-tests.lst) tests selected after cu_skip=$SCSIGATE_CU_SKIP"
    tests=/tmp/cu-tests.lst
fi
log "iscsi-test-cu -d -t $tests /dev/$sg"
echo "SCSIGATE-CUNIT-BEGIN"
start=$(cut -d. -f1 /proc/uptime)
if [ -n "${SCSIGATE_CU_TIMEOUT:-}" ]; then
    { timeout -s KILL "$SCSIGATE_CU_TIMEOUT" iscsi-test-cu -d -v -t "$tests" "/dev/$sg"; echo $? > /tmp/cu.rc; } 2>&1 | tee /tmp/cu.log
else
    { iscsi-test-cu -d -v -t "$tests" "/dev/$sg"; echo $? > /tmp/cu.rc; } 2>&1 | tee /tmp/cu.log
fi
cu_rc=$(cat /tmp/cu.rc 2>/dev/null || echo unknown)
end=$(cut -d. -f1 /proc/uptime)
echo "SCSIGATE-CUNIT-END rc=$cu_rc seconds=$((end - start))"
# Run Summary "tests" row: tests Total Ran Passed Failed Inactive
row=$(grep -E '^ +tests +[0-9]+' /tmp/cu.log | tail -1)
if [ -z "$row" ] && [ -n "${SCSIGATE_CU_TIMEOUT:-}" ] && [ "$cu_rc" = 137 ]; then
    echo "SCSIGATE-CUNIT-TIMEOUT seconds=$SCSIGATE_CU_TIMEOUT"
    log "FAIL: iscsi-test-cu killed after ${SCSIGATE_CU_TIMEOUT}s"; exit 124
fi
if [ -z "$row" ]; then log "FAIL: iscsi-test-cu printed no Run Summary (crashed or hung?)"; exit 1; fi
set -- $row
failed=$5
log "total=$2 ran=$3 passed(incl. skipped)=$4 failed=$failed"
if [ -n "${SCSIGATE_CU_MAX_FAILED:-}" ] && [ "$failed" -gt "$SCSIGATE_CU_MAX_FAILED" ]; then
    log "FAIL: $failed failed tests > allowed ${SCSIGATE_CU_MAX_FAILED}"
    exit 1
fi
exit 0
