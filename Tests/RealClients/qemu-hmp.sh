#!/usr/bin/env bash
# Send one human-monitor command to a QEMU started with -monitor tcp:127.0.0.1:PORT,server,nowait
# (loopback only) and print its answer. Used to hotplug QEMU's own devices in selftest.sh.
# Usage: qemu-hmp.sh PORT 'device_add scsi-hd,drive=d1,id=hd1'
set -euo pipefail
[ $# = 2 ] || { sed -n '2,4p' "$0"; exit 2; }
exec 3<>"/dev/tcp/127.0.0.1/$1"
printf '%s\n' "$2" >&3
sleep 1
timeout 2 cat <&3 | tr -d '\r' | sed 's/\x1b\[[0-9;]*[A-Za-z]//g' | grep -av '^(qemu)\|^QEMU .* monitor\|^$' || true
exec 3>&-
