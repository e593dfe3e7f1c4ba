#!/usr/bin/env bash
# Check that the data the guest's pattern test wrote is byte-identical in the backing file.
# Usage: check-pattern.sh CONSOLE_LOG BACKING_FILE
# Exit 0 when the sha256 of the same byte range of BACKING_FILE matches the guest's.
set -euo pipefail
[ $# = 2 ] || { sed -n '2,4p' "$0"; exit 2; }
line=$(tr -d '\r' < "$1" | grep -a '^SCSIGATE-PATTERN ' | tail -1)
[ -n "$line" ] || { echo "check-pattern: no SCSIGATE-PATTERN line in $1" >&2; exit 2; }
off=$(sed -n 's/.* offset=\([0-9]*\).*/\1/p' <<<"$line")
bytes=$(sed -n 's/.* bytes=\([0-9]*\).*/\1/p' <<<"$line")
want=$(sed -n 's/.* sha256=\([0-9a-f]*\).*/\1/p' <<<"$line")
got=$(dd if="$2" iflag=skip_bytes,count_bytes skip="$off" count="$bytes" bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$got" = "$want" ]; then
    echo "check-pattern: PASS $bytes bytes at offset $off of $2 match the guest (sha256 $want)"
else
    echo "check-pattern: FAIL $2 [$off, +$bytes) sha256 $got, guest wrote $want"; exit 1
fi
