#!/usr/bin/env bash
# Fill one of the domain templates in Deploy/libvirt/ (vhost-user-blk.xml, vhost-user-scsi.xml, pvscsi.xml)
# and print the domain XML for `virsh define`.
#
# Usage: render.sh TRANSPORT --name NAME --socket PATH [options] > domain.xml
#   TRANSPORT            vhost-user-blk | vhost-user-scsi | pvscsi (the controller's `transport`)
#   --name NAME          libvirt domain name
#   --socket PATH        the controller's socket (`socket` in the gateway config)
#   --emulator PATH      QEMU binary (default /usr/bin/qemu-system-x86_64; pvscsi needs QEMU >= 10.1,
#                        e.g. Tests/RealClients/chroot/qemu-sid.sh)
#   --memory MIB         guest RAM (default 1024)
#   --queues N           the controller's `queues` (default 1)
#   --kernel FILE --initrd FILE --cmdline TEXT
#                        direct kernel boot (default: boot from the first disk, <boot dev='hd'/>)
#   --console-log FILE   serial console (ttyS0) to FILE (default: a pty, `virsh console NAME`)
#   --on-reboot ACTION   restart (default) or destroy
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true   # bash 5.2: "&" in a ${x//p/r} replacement is literal
HERE=$(cd "$(dirname "$0")" && pwd)
die() { echo "render.sh: $*" >&2; exit 64; }
# xml TEXT: TEXT escaped for an XML attribute or element
xml() { local s=$1; s=${s//&/&amp;}; s=${s//</&lt;}; s=${s//>/&gt;}; s=${s//\'/&apos;}; s=${s//\"/&quot;}; printf '%s' "$s"; }

[ $# -ge 1 ] || { sed -n '2,18p' "$0" >&2; exit 64; }
transport=$1; shift
case $transport in
    vhost-user-blk|vhost-user-scsi|pvscsi) ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) die "unknown transport '$transport' (vhost-user-blk, vhost-user-scsi or pvscsi)" ;;
esac
name= socket= emulator=/usr/bin/qemu-system-x86_64 memory=1024 queues=1 kernel= initrd= cmdline= console= onreboot=restart
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || die "$1 needs a value"
    case $1 in
        --name) name=$2 ;;
        --socket) socket=$2 ;;
        --emulator) emulator=$2 ;;
        --memory) memory=$2 ;;
        --queues) queues=$2 ;;
        --kernel) kernel=$2 ;;
        --initrd) initrd=$2 ;;
        --cmdline) cmdline=$2 ;;
        --console-log) console=$2 ;;
        --on-reboot) onreboot=$2 ;;
        *) die "unknown argument: $1" ;;
    esac
    shift 2
done
[ -n "$name" ] || die "--name is required"
[ -n "$socket" ] || die "--socket is required"
case $socket in /*) ;; *) die "--socket must be an absolute path: $socket" ;; esac
case $memory in ''|*[!0-9]*) die "--memory must be MiB: $memory" ;; esac
case $queues in ''|*[!0-9]*|0) die "--queues must be 1..64: $queues" ;; esac
case $onreboot in restart|destroy) ;; *) die "--on-reboot must be restart or destroy: $onreboot" ;; esac
# In the vfio-user JSON the socket path is a JSON string inside an XML attribute.
case $socket in *[\"\\]*) die "--socket must not contain a quote or backslash: $socket" ;; esac

if [ -n "$kernel" ]; then
    [ -n "$initrd" ] || die "--kernel needs --initrd"
    boot="<kernel>$(xml "$kernel")</kernel>
    <initrd>$(xml "$initrd")</initrd>
    <cmdline>$(xml "$cmdline")</cmdline>"
else
    boot="<boot dev='hd'/>"
fi
if [ -n "$console" ]; then
    serial="<serial type='file'>
      <source path='$(xml "$console")'/>
      <target port='0'/>
    </serial>"
else
    serial="<serial type='pty'>
      <target port='0'/>
    </serial>"
fi
t=$(cat "$HERE/$transport.xml")
t=${t//@NAME@/$(xml "$name")}
t=${t//@SOCKET@/$(xml "$socket")}
t=${t//@EMULATOR@/$(xml "$emulator")}
t=${t//@MEMORY_MIB@/$memory}
t=${t//@QUEUES@/$queues}
t=${t//@ON_REBOOT@/$onreboot}
t=${t//@BOOT@/$boot}
t=${t//@SERIAL@/$serial}
printf '%s\n' "$t"
