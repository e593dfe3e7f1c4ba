#!/usr/bin/env bash
# Wait until a console log (run-guest.sh --log FILE, run in the background) contains a
# line starting with MARKER; print that line. For host actions timed against the guest
# (hotplug: SCSIGATE-HOTPLUG-READY, SCSIGATE-HOTPLUG-ADDED, ...).
# Usage: wait-marker.sh LOG MARKER [TIMEOUT_SECS=300]
# Exit 0 found, 1 timeout, 3 the guest ended (SCSIGATE-GUEST-EXIT) before the marker.
set -uo pipefail
[ $# -ge 2 ] || { sed -n '2,6p' "$0"; exit 2; }
log=$1 marker=$2 max=${3:-300}
end=$(( $(date +%s) + max ))
while [ "$(date +%s)" -lt "$end" ]; do
    if [ -f "$log" ]; then
        line=$(tr -d '\r' < "$log" | grep -a -m1 "^$marker" || true)
        [ -n "$line" ] && { echo "$line"; exit 0; }
        tr -d '\r' < "$log" | grep -a -q '^SCSIGATE-GUEST-EXIT' && { echo "wait-marker: guest ended before $marker" >&2; exit 3; }
    fi
    sleep 0.5
done
echo "wait-marker: no $marker in $log after ${max}s" >&2
exit 1
