#!/usr/bin/env bash
# Build (once) a clean Debian bookworm minbase chroot with fresh apt lists, for installing ScsiGate's .deb
# the way an operator would (`apt-get install ./scsigate_*.deb` resolves its dependencies from the mirror).
# Use it through an overlay or a copy (Tests/RealClients/suites/package.sh does): the cached tree stays clean.
#
# Usage: make-bookworm-chroot.sh [--force]
# Env: SCSIGATE_CACHE (default /var/cache/scsigate), SCSIGATE_BOOKWORM (default $SCSIGATE_CACHE/bookworm),
#      SCSIGATE_DEBIAN_MIRROR (default http://deb.debian.org/debian)
# Prints the chroot directory on stdout.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../../../Deploy/lib.sh"

DIR=${SCSIGATE_BOOKWORM:-$SCSIGATE_CACHE/bookworm}
MIRROR=${SCSIGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
STAMP="$DIR/.scsigate-complete"
force=0
case ${1:-} in
    --force) force=1 ;;
    '') ;;
    *) sg_die "unknown argument: $1 (usage: make-bookworm-chroot.sh [--force])" ;;
esac
sg_require_root
sg_lock bookworm
if [ $force = 0 ] && [ -f "$STAMP" ] && [ -x "$DIR/usr/bin/apt-get" ]; then
    sg_log "cached bookworm chroot OK: $DIR ($(head -1 "$STAMP"))"
    echo "$DIR"; exit 0
fi
sg_apt_install debootstrap debian-archive-keyring
if awk -v d="$DIR" 'index($2, d) == 1 {f=1} END {exit !f}' /proc/self/mounts; then
    sg_die "refusing to rebuild $DIR: something is mounted under it"
fi
rm -rf "$DIR.tmp"
sg_log "debootstrap bookworm minbase into $DIR.tmp (about 2 minutes)"
debootstrap --variant=minbase bookworm "$DIR.tmp" "$MIRROR" >&2 \
    || { tail -20 "$DIR.tmp/debootstrap/debootstrap.log" >&2 2>/dev/null; sg_die "debootstrap failed"; }
echo "deb $MIRROR bookworm main" > "$DIR.tmp/etc/apt/sources.list"
chroot "$DIR.tmp" apt-get -o Acquire::Retries=3 update >&2 || sg_die "apt-get update in the chroot failed"
chroot "$DIR.tmp" apt-get clean
rm -rf "$DIR"
mv "$DIR.tmp" "$DIR"
date -u +%FT%TZ > "$STAMP"
sg_log "bookworm chroot ready: $DIR"
echo "$DIR"
