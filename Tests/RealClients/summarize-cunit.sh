#!/usr/bin/env bash
# Summarize an iscsi-test-cu run (verbose CUnit output) found in a guest console
# log or a plain log: counts from CUnit's Run Summary, skipped tests (those that
# printed [SKIPPED]) and the names of the failed tests.
#
# Usage: summarize-cunit.sh LOG [--max-failed N]
# Prints key=value lines: total ran passed failed skipped inactive excluded, then
# FAILED:/SKIPPED:/EXCLUDED: Suite.Test lines (passed excludes the skipped tests).
# Exit: 0 ok, 1 more than N failed, 2 no Run Summary in the log (run incomplete).
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,8p' "$0"; exit 2; }
log=$1; shift
max=
while [ $# -gt 0 ]; do
    case $1 in
        --max-failed) max=$2; shift ;;
        *) echo "summarize-cunit.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
[ -r "$log" ] || { echo "summarize-cunit.sh: cannot read $log" >&2; exit 2; }

tr -d '\r' < "$log" | awk -v max="$max" '
function finish(res) {
    if (cur == "") return
    if (res == "FAILED") failed_names[++nf] = cur
    else if (skip) skipped_names[++ns] = cur
    results[cur] = res; cur = ""; skip = 0
}
/^SCSIGATE-CUNIT-EXCLUDED: / { excluded[++nx] = $2; next }
/^Suite: / { finish_pending(); suite = $2; next }
/^  Test: / {
    finish_pending()
    line = $0; sub(/^  Test: /, "", line)
    name = line; sub(/ \.\.\..*$/, "", name)
    rest = line; sub(/^[^.]*\.\.\./, "", rest)
    cur = suite "." name; skip = (rest ~ /\[SKIPPED\]/)
    if (rest ~ /^passed/) finish("passed")
    else if (rest ~ /^FAILED/) finish("FAILED")
    next
}
/Run Summary:/ { finish_pending(); insum = 1; next }
insum && $1 == "tests" { total = $2; ran = $3; passed = $4; failed = $5; inactive = $6; have = 1; insum = 0; next }
cur != "" && /\[SKIPPED\]/ { skip = 1 }
cur != "" && /(passed|FAILED)[ \t]*$/ { r = ($0 ~ /FAILED[ \t]*$/) ? "FAILED" : "passed"; finish(r); next }
function finish_pending() { if (cur != "") { unknown[++nu] = cur; cur = ""; skip = 0 } }
END {
    finish_pending()
    if (!have) {
        print "summary=missing"
        print "error=no CUnit Run Summary in the log (run incomplete?)"
        printf "failed_so_far=%d\n", nf
        for (i = 1; i <= nf; i++) print "FAILED: " failed_names[i]
        for (i = 1; i <= nu; i++) print "NO-RESULT: " unknown[i]
        exit 2
    }
    printf "total=%d\nran=%d\npassed=%d\nfailed=%d\nskipped=%d\ninactive=%d\n", total, ran, passed - ns, failed, ns, inactive
    printf "passed_including_skipped=%d\nexcluded=%d\n", passed, nx
    for (i = 1; i <= nf; i++) print "FAILED: " failed_names[i]
    for (i = 1; i <= ns; i++) print "SKIPPED: " skipped_names[i]
    for (i = 1; i <= nu; i++) print "NO-RESULT: " unknown[i]
    for (i = 1; i <= nx; i++) print "EXCLUDED: " excluded[i]
    if (nf != failed) printf "warning=parsed %d failed test names, CUnit counted %d\n", nf, failed
    if (max != "" && failed > max + 0) { printf "verdict=FAIL (%d failed > %d allowed)\n", failed, max; exit 1 }
    print "verdict=" (max == "" ? "REPORTED" : "OK")
}'
