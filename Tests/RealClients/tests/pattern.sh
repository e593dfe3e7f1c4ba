#!/bin/sh
# pattern: write random data to the selected disk (O_DIRECT, then flush) and print its
# sha256 so the host can check the backing file byte for byte (check-pattern.sh).
#   scsigate.pattern_mb=N     MiB to write (default 16)
#   scsigate.pattern_off_mb=N start offset in MiB (default: the last N MiB of the disk,
#                             which fio-verify and discard, working from offset 0, leave alone)
. /tests/lib/common.sh
wait_for_disks || exit 1
d=$(find_disk) || exit 1
n=${SCSIGATE_PATTERN_MB:-16}
o=${SCSIGATE_PATTERN_OFF_MB:-$(( $(disk_bytes "$d") / 1048576 - n ))}
dd if=/dev/urandom of=/tmp/pattern bs=1M count="$n" 2>/dev/null || { log "FAIL: cannot make pattern"; exit 1; }
want=$(sha256sum /tmp/pattern | cut -d' ' -f1)
dd if=/tmp/pattern of="/dev/$d" bs=1M seek="$o" count="$n" oflag=direct conv=notrunc,fsync 2>&1 | tail -1
rc=$?
sync
# read back through the page cache bypass as a first check
got=$(dd if="/dev/$d" bs=1M skip="$o" count="$n" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
echo "SCSIGATE-PATTERN disk=$d offset=$((o * 1048576)) bytes=$((n * 1048576)) sha256=$want"
if [ "$got" = "$want" ]; then log "PASS: read back matches"; exit 0; fi
log "FAIL: read back sha256 $got differs"
exit 1
