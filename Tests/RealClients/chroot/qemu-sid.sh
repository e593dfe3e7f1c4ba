#!/usr/bin/env bash
# libvirt <emulator> for QEMU >= 10.1 (vfio-user-pci, for PVSCSI) on a host whose own QEMU is older:
# runs Debian sid's qemu-system-x86_64 from the chroot of Tests/RealClients/chroot/make-sid-chroot.sh through
# Tests/RealClients/chroot/sid-run.sh (private mount namespace; /dev, /proc, /sys, /tmp and /var/tmp are visible).
# libvirt's own directories (/var/lib/libvirt, /run/libvirt, /var/log/libvirt, /var/cache/libvirt) and
# ScsiGate's (/run/scsigate, /var/lib/scsigate) are bound at the same paths, so QEMU finds its monitor
# socket, pid file and the gateway's sockets there.
#
# Usage: qemu-sid.sh [--bind DIR]... [--ro-bind DIR]... QEMU-ARGS...
#   libvirt calls <emulator> with QEMU's arguments only: for other paths the guest needs (a kernel, an initrd,
#   a socket directory), point <emulator> at a two-line script that adds them:
#     #!/bin/sh
#     exec /path/to/Tests/RealClients/chroot/qemu-sid.sh --ro-bind /srv/kernels --bind /srv/sockets "$@"
# The chroot must exist (make-sid-chroot.sh, run once as root); this script never builds it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
binds=()
while [ $# -gt 0 ]; do
    case $1 in
        --bind|--ro-bind) binds+=("$1" "$2"); shift 2 ;;
        *) break ;;
    esac
done
for d in /var/lib/libvirt /run/libvirt /var/log/libvirt /var/cache/libvirt /run/scsigate /var/lib/scsigate; do
    [ -d "$d" ] && binds+=(--bind "$d")
done
exec "$HERE/sid-run.sh" --no-build "${binds[@]}" -- /usr/bin/qemu-system-x86_64 "$@"
