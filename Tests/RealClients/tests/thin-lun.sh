#!/bin/sh
# thin-lun: two thin (sparse) LUNs on small host tmpfs filesystems that run out of space under the
# guest's writes. Host side (suites/thin-lun.sh) frees space when it sees the markers.
#   serial SGTHIN-REPORT (out_of_space = "report"): a write past the free space fails at once with
#     DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (27h/07h; Linux: "critical space allocation
#     error", -ENOSPC); data written before reads back intact; after SCSIGATE-THIN-FULL the host frees
#     space and the same write succeeds, without a restart.
#   serial SGTHIN-HOLD (out_of_space = "hold"): the write that fills the filesystem is held (dd blocks);
#     after SCSIGATE-THIN-HOLDING the host frees space and dd finishes without an error; data intact.
. /tests/lib/common.sh
wait_for_disks || exit 1
by_serial() { for d in $(list_disks); do [ "$(disk_serial "$d")" = "$1" ] && echo "$d" && return 0; done; return 1; }
r=$(by_serial SGTHIN-REPORT) || { log "FAIL: no disk with serial SGTHIN-REPORT"; exit 1; }
h=$(by_serial SGTHIN-HOLD) || { log "FAIL: no disk with serial SGTHIN-HOLD"; exit 1; }
log "report disk /dev/$r, hold disk /dev/$h"
rc=0
dd if=/dev/urandom of=/tmp/pattern bs=65536 count=48 2>/dev/null   # 3 MiB

# --- report ---
dd if=/tmp/pattern of=/dev/$r bs=65536 count=16 oflag=direct 2>/dev/null || { log "FAIL: first 1 MiB not written"; rc=1; }
dmesg -c >/dev/null
if dd if=/dev/zero of=/dev/$r bs=65536 count=64 seek=16 oflag=direct 2>/tmp/dd.err; then
    log "FAIL: 4 MiB written past the free space without an error"; rc=1
else
    log "write past the free space failed: $(tail -1 /tmp/dd.err)"
fi
dmesg | grep -i -E "sense|space allocation|critical" | head -5 | sed "s/^/[thin-lun] guest dmesg: /"
if dmesg | grep -q -i "Space allocation failed write protect"; then
    log "sense DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT seen"
else
    log "FAIL: no 'Space allocation failed write protect' sense in dmesg"; rc=1
fi
dmesg | grep -q -i "critical space allocation error" && log "block layer: critical space allocation error (BLK_STS_NOSPC)"
dd if=/dev/$r of=/tmp/back bs=65536 count=16 iflag=direct 2>/dev/null
head -c 1048576 /tmp/pattern > /tmp/want
cmp -s /tmp/back /tmp/want && log "data written before the failure reads back intact" || { log "FAIL: first 1 MiB differs"; rc=1; }
echo "SCSIGATE-THIN-FULL"
ok=0 n=0
while [ $n -lt 60 ]; do
    if dd if=/tmp/pattern of=/dev/$r bs=65536 count=16 seek=16 oflag=direct 2>/dev/null; then ok=1; break; fi
    sleep 1; n=$((n + 1))
done
if [ $ok = 1 ]; then
    dd if=/dev/$r of=/tmp/back bs=65536 count=32 iflag=direct 2>/dev/null
    head -c 1048576 /tmp/pattern | cat /tmp/want - > /tmp/want2
    cmp -s /tmp/back /tmp/want2 && log "after space was freed: writes work again (${n}s), 2 MiB intact" || { log "FAIL: data differs after the retry"; rc=1; }
else
    log "FAIL: writes still fail 60 s after SCSIGATE-THIN-FULL"; rc=1
fi

# --- hold ---
dmesg -c >/dev/null
echo "SCSIGATE-THIN-HOLDING"
if dd if=/tmp/pattern of=/dev/$h bs=65536 count=48 oflag=direct 2>/tmp/dd.err; then
    log "3 MiB written through the out-of-space hold without an error"
else
    log "FAIL: dd failed on the hold disk: $(tail -1 /tmp/dd.err)"; rc=1
fi
if dmesg | grep -q -i -E "space allocation|I/O error|timing out|abort"; then
    log "FAIL: the guest saw an error or timeout during the hold:"; dmesg | tail -5; rc=1
fi
dd if=/dev/$h of=/tmp/back bs=65536 count=48 iflag=direct 2>/dev/null
cmp -s /tmp/back /tmp/pattern && log "hold disk: 3 MiB intact" || { log "FAIL: hold disk data differs"; rc=1; }
[ $rc = 0 ] && log PASS
exit $rc
