#!/bin/sh
# multi: run several guest tests in one boot, in order.
#   scsigate.tests=smoke,fio-verify,conformance
# Prints "SCSIGATE-TEST-RESULT name=NAME rc=N" per test; exits with the number that failed.
. /tests/lib/common.sh
[ -n "${SCSIGATE_TESTS:-}" ] || { log "scsigate.tests=LIST is required"; exit 127; }
failed=0
for t in $(echo "$SCSIGATE_TESTS" | tr ',' ' '); do
    if [ "$t" = multi ] || [ ! -x "/tests/$t.sh" ]; then
        echo "SCSIGATE-TEST-RESULT name=$t rc=127"; failed=$((failed + 1)); continue
    fi
    echo "== $t"
    SCSIGATE_TEST=$t /bin/sh "/tests/$t.sh"
    rc=$?
    echo "SCSIGATE-TEST-RESULT name=$t rc=$rc"
    [ $rc = 0 ] || failed=$((failed + 1))
done
exit $failed
