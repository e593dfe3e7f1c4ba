#!/bin/sh
# conformance: libiscsi's iscsi-test-cu over SG_IO on the selected SCSI disk.
#   scsigate.cu_tests=REGEX      test selection (default SCSI)
#   scsigate.cu_max_failed=N     exit 1 when more than N tests fail (default: report only)
# The CUnit output (verbose: one line per test) and its Run Summary table go to the console;
# Deploy/guest/summarize-cunit.sh extracts the counts from the console log.
. /tests/lib/common.sh
wait_for_disks || exit 1
d=$(find_disk) || exit 1
sg=$(disk_sg "$d") || { log "$d is not a SCSI disk (no sg node): conformance needs SCSI"; exit 1; }
log "disk $d /dev/$sg vendor=$(disk_vendor "$d") model=$(disk_model "$d") bytes=$(disk_bytes "$d")"
echo "== sg_inq /dev/$sg"; sg_inq "/dev/$sg" 2>&1
echo "== sg_readcap -l /dev/$sg"; sg_readcap -l "/dev/$sg" 2>&1
tests=${SCSIGATE_CU_TESTS:-SCSI}
log "iscsi-test-cu -d -t $tests /dev/$sg"
echo "SCSIGATE-CUNIT-BEGIN"
start=$(cut -d. -f1 /proc/uptime)
{ iscsi-test-cu -d -v -t "$tests" "/dev/$sg"; echo $? > /tmp/cu.rc; } 2>&1 | tee /tmp/cu.log
cu_rc=$(cat /tmp/cu.rc 2>/dev/null || echo unknown)
end=$(cut -d. -f1 /proc/uptime)
echo "SCSIGATE-CUNIT-END rc=$cu_rc seconds=$((end - start))"
# Run Summary "tests" row: tests Total Ran Passed Failed Inactive
row=$(grep -E '^ +tests +[0-9]+' /tmp/cu.log | tail -1)
if [ -z "$row" ]; then log "FAIL: iscsi-test-cu printed no Run Summary (crashed or hung?)"; exit 1; fi
set -- $row
failed=$5
skipped=$(grep -c '\[SKIPPED\]' /tmp/cu.log)
log "total=$2 ran=$3 passed=$4 failed=$failed skipped_messages=$skipped"
if [ -n "${SCSIGATE_CU_MAX_FAILED:-}" ] && [ "$failed" -gt "$SCSIGATE_CU_MAX_FAILED" ]; then
    log "FAIL: $failed failed tests > allowed ${SCSIGATE_CU_MAX_FAILED}"
    exit 1
fi
exit 0
