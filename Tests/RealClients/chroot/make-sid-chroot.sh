#!/usr/bin/env bash
# Build (once) a Debian sid chroot with QEMU >= 10.1 (vfio-user-pci) and
# qemu-img / qemu-storage-daemon with the libblkio virtio-blk-vhost-user driver.
#
# Usage: make-sid-chroot.sh [--force] [--check]
#   --force  rebuild even if the cached chroot is complete
#   --check  only verify the cached chroot; exit 1 if absent or incomplete
# Env: SCSIGATE_CACHE (default /var/cache/scsigate), SCSIGATE_SID (default $SCSIGATE_CACHE/sid),
#      SCSIGATE_DEBIAN_MIRROR (default http://deb.debian.org/debian)
# Prints the chroot directory on stdout.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../../../Deploy/lib.sh"

SID=${SCSIGATE_SID:-$SCSIGATE_CACHE/sid}
MIRROR=${SCSIGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=qemu-system-x86,qemu-utils,qemu-block-extra
STAMP="$SID/.scsigate-complete"
MIN_MAJOR=10 MIN_MINOR=1

force=0 checkonly=0
for a in "$@"; do
    case $a in
        --force) force=1 ;;
        --check) checkonly=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) sg_die "unknown argument: $a" ;;
    esac
done

# verify DIR: prints a one-line summary, returns non-zero with a reason on stderr if unusable
verify() {
    local dir=$1 ver major minor
    [ -x "$dir/usr/bin/qemu-system-x86_64" ] || { sg_log "missing qemu-system-x86_64 in $dir"; return 1; }
    ver=$(chroot "$dir" /usr/bin/qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p')
    [ -n "$ver" ] || { sg_log "cannot read QEMU version in $dir"; return 1; }
    major=${ver%%.*}; minor=${ver#*.}; minor=${minor%%.*}
    if [ "$major" -lt $MIN_MAJOR ] || { [ "$major" -eq $MIN_MAJOR ] && [ "$minor" -lt $MIN_MINOR ]; }; then
        sg_log "QEMU $ver in $dir is older than $MIN_MAJOR.$MIN_MINOR"; return 1
    fi
    chroot "$dir" /usr/bin/qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vfio-user-pci"' \
        || { sg_log "QEMU $ver in $dir lacks vfio-user-pci"; return 1; }
    chroot "$dir" /usr/bin/qemu-img --help 2>/dev/null | grep -q 'virtio-blk-vhost-user' \
        || { sg_log "qemu-img in $dir lacks the virtio-blk-vhost-user driver (qemu-block-extra/libblkio)"; return 1; }
    [ -x "$dir/usr/bin/qemu-storage-daemon" ] || { sg_log "missing qemu-storage-daemon in $dir"; return 1; }
    echo "QEMU $ver, vfio-user-pci, virtio-blk-vhost-user"
}

mounted_under() { awk -v d="$1" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/self/mounts; }

[ $checkonly = 1 ] || sg_lock sid
if [ $force = 0 ] && [ -f "$STAMP" ] && summary=$(verify "$SID"); then
    sg_log "cached sid chroot OK: $SID ($summary)"
    echo "$SID"; exit 0
fi
[ $checkonly = 1 ] && { sg_log "sid chroot $SID absent or incomplete"; exit 1; }

sg_require_root
sg_apt_install debootstrap debian-archive-keyring

for d in "$SID" "$SID.tmp"; do
    if [ -n "$(mounted_under "$d")" ]; then
        sg_die "refusing to delete $d: something is mounted under it ($(mounted_under "$d" | head -1))"
    fi
done
rm -rf "$SID.tmp"
mkdir -p "$(dirname "$SID")"
sg_log "debootstrap sid into $SID.tmp (about 2 minutes)"
debootstrap --variant=minbase --include="$PACKAGES" sid "$SID.tmp" "$MIRROR" >&2 \
    || { tail -20 "$SID.tmp/debootstrap/debootstrap.log" >&2 2>/dev/null; sg_die "debootstrap failed"; }
summary=$(verify "$SID.tmp") || sg_die "new sid chroot failed verification"
chroot "$SID.tmp" apt-get clean || true
rm -rf "$SID"
mv "$SID.tmp" "$SID"
date -u +%FT%TZ > "$STAMP"
echo "$summary" >> "$STAMP"
sg_log "sid chroot ready: $SID ($summary)"
echo "$SID"
