#!/bin/sh
# fio-verify: randwrite + verify (crc32c), libaio, O_DIRECT, QD16, at 4 KiB and 64 KiB,
# on the selected disk (see lib/common.sh). DESTROYS the data in the range.
#   scsigate.size=SIZE    bytes per job, fio syntax (default 64M)
#   scsigate.offset=OFF   start offset (default 0)
#   scsigate.bs=LIST      block sizes, comma separated (default 4k,64k)
#   scsigate.iodepth=N    queue depth (default 16)
#   scsigate.runtime=SECS minimum run time: each block size's randwrite+verify pass is repeated (a full
#                         write pass, then its verify) until SECS seconds have passed since the test
#                         began (default 0: one pass per block size); every pass is checked
. /tests/lib/common.sh
wait_for_disks || exit 1
d=$(find_disk) || exit 1
size=${SCSIGATE_SIZE:-64M}
offset=${SCSIGATE_OFFSET:-0}
qd=${SCSIGATE_IODEPTH:-16}
log "disk /dev/$d vendor=$(disk_vendor "$d") bytes=$(disk_bytes "$d") size=$size offset=$offset qd=$qd"
runtime=${SCSIGATE_RUNTIME:-0}
t0=$(cut -d' ' -f1 /proc/uptime | cut -d. -f1)
pass=0 fail=0 round=0
while :; do
round=$((round + 1))
for bs in $(echo "${SCSIGATE_BS:-4k,64k}" | tr ',' ' '); do
    out=/tmp/fio-$bs.log
    start=$(cut -d' ' -f1 /proc/uptime)
    fio --name="verify-$bs" --filename="/dev/$d" --ioengine=libaio --direct=1 \
        --rw=randwrite --bs="$bs" --iodepth="$qd" --size="$size" --offset="$offset" \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 \
        --randrepeat=0 --group_reporting=1 > "$out" 2>&1
    rc=$?
    end=$(cut -d' ' -f1 /proc/uptime)
    cat "$out"
    # "verify-4k: (groupid=0, jobs=1): err= 0: pid=..." ; verify errors print "verify: bad ..."
    errline=$(grep -o 'err= *[0-9]*' "$out" | head -1 | tr -d ' ')
    verrs=$(grep -c -i 'verify: bad\|bad magic\|crc32c: verify failed\|io_u error' "$out")
    if [ "$rc" = 0 ] && [ "$errline" = "err=0" ] && [ "$verrs" = 0 ]; then
        log "fio $bs: PASS (fio rc=$rc ${errline:-err=?} verify_errors=$verrs, ${start}s..${end}s uptime)"
        pass=$((pass + 1))
    else
        log "fio $bs: FAIL (fio rc=$rc ${errline:-err=?} verify_errors=$verrs)"
        fail=$((fail + 1))
    fi
done
now=$(cut -d' ' -f1 /proc/uptime | cut -d. -f1)
[ $fail = 0 ] && [ $((now - t0)) -lt "$runtime" ] || break
log "fio-verify: round $round done after $((now - t0)) s of at least ${runtime} s; again"
done
now=$(cut -d' ' -f1 /proc/uptime | cut -d. -f1)
log "fio-verify: $pass passed, $fail failed ($round rounds, $((now - t0)) s)"
[ $fail = 0 ] && [ $pass -gt 0 ]
