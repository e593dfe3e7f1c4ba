#!/bin/sh
# qos-fio: per-LUN QoS seen from a guest (Benchmarks/qos-guest.sh). Two disks on one controller,
# serial SGQOS-LIMITED (an iops_limit) and SGQOS-FREE (no limit): fio 4 KiB random reads, libaio,
# O_DIRECT, first on the free disk alone, then on both at once. Prints
#   SCSIGATE-QOS phase=alone free=N
#   SCSIGATE-QOS phase=both limited=N free=M
#   scsigate.runtime=S   seconds per phase (default 20)   scsigate.iodepth=N (default 32)
. /tests/lib/common.sh
wait_for_disks || exit 1
by_serial() { for d in $(list_disks); do [ "$(disk_serial "$d")" = "$1" ] && echo "$d" && return 0; done; return 1; }
l=$(by_serial SGQOS-LIMITED) || { log "FAIL: no disk SGQOS-LIMITED"; exit 1; }
f=$(by_serial SGQOS-FREE) || { log "FAIL: no disk SGQOS-FREE"; exit 1; }
rt=${SCSIGATE_RUNTIME:-20} qd=${SCSIGATE_IODEPTH:-32}
run() {  # run DISK...: one fio job per disk, all at once; prints each job's read IOPS, in order
    args=""
    for d in "$@"; do args="$args --name=$d --filename=/dev/$d"; done
    fio --ioengine=libaio --direct=1 --rw=randread --bs=4k --iodepth="$qd" --size=64M --runtime="$rt" \
        --time_based=1 --ramp_time=2 --output-format=terse --terse-version=3 $args > /tmp/qos.log 2>&1 || return 1
    awk -F';' 'NF > 8 { printf "%s ", $8 }' /tmp/qos.log
}
alone=$(run "$f") || { log "FAIL: fio on the free disk"; cat /tmp/qos.log; exit 1; }
echo "SCSIGATE-QOS phase=alone free=$alone"
both=$(run "$l" "$f") || { log "FAIL: fio on both disks"; cat /tmp/qos.log; exit 1; }
set -- $both
echo "SCSIGATE-QOS phase=both limited=$1 free=$2"
log PASS
