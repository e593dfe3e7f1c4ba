#!/usr/bin/env bash
# Run a command inside the sid chroot (make-sid-chroot.sh) in a private mount
# namespace: /dev (+pts, shm), /proc, /sys, /tmp, /var/tmp and every --bind DIR are
# mounted at the same paths inside; the mounts vanish when the command exits, so
# concurrent runs (qemu-storage-daemon + qemu-img, or a guest QEMU) do not collide.
#
# Usage: sid-run.sh [--bind DIR]... [--ro-bind DIR]... [--no-build] [--] COMMAND [ARGS...]
#        sid-run.sh --umount   (removes the mounts of the fallback mode, see below)
#   --bind DIR     make host DIR (file or directory) visible at the same path, read-write
#   --ro-bind DIR  same, read-only
#   --no-build     fail instead of building the chroot when it is missing
# The working directory is kept when it exists inside the chroot.
# Env: SCSIGATE_SID (default $SCSIGATE_CACHE/sid)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../../../Deploy/lib.sh"

binds=() robinds=() build=1
while [ $# -gt 0 ]; do
    case $1 in
        --umount)
            SID=${SCSIGATE_SID:-$SCSIGATE_CACHE/sid}
            awk -v d="$SID" 'index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
                umount -l "$m" 2>/dev/null || true
            done
            exit 0 ;;
        --bind) binds+=("$2"); shift ;;
        --ro-bind) robinds+=("$2"); shift ;;
        --no-build) build=0 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        -*) sg_die "unknown option: $1" ;;
        *) break ;;
    esac
    shift
done
[ $# -ge 1 ] || sg_die "no command given"
sg_require_root

if [ $build = 1 ]; then
    SID=$("$HERE/make-sid-chroot.sh") || sg_die "make-sid-chroot.sh failed"
else
    SID=$("$HERE/make-sid-chroot.sh" --check) || sg_die "sid chroot missing (run make-sid-chroot.sh)"
fi
for p in "${binds[@]}" "${robinds[@]}"; do
    [ -e "$p" ] || sg_die "--bind path does not exist: $p"
done

# The inner script runs in the new mount namespace (unshare --mount, private propagation).
inner='
set -eu
R=$1; shift
nb=$1; shift
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
for d in /tmp /var/tmp; do mkdir -p "$R$d"; mount --bind "$d" "$R$d"; done
i=0
while [ $i -lt "$nb" ]; do
    mode=$1 p=$2; shift 2; i=$((i + 1))
    p=$(readlink -f "$p")
    if [ -d "$p" ]; then mkdir -p "$R$p"; else mkdir -p "$R$(dirname "$p")"; [ -e "$R$p" ] || : > "$R$p"; fi
    mount --bind "$p" "$R$p"
    [ "$mode" = ro ] && mount -o remount,bind,ro "$R$p"
done
cwd=$(pwd)
exec chroot "$R" /bin/sh -c "cd \"\$0\" 2>/dev/null || cd /; exec \"\$@\"" "$cwd" "$@"
'
args=()
for p in "${binds[@]}"; do args+=(rw "$p"); done
for p in "${robinds[@]}"; do args+=(ro "$p"); done
nb=$(( ${#args[@]} / 2 ))
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if mountpoint -q / && unshare --mount --propagation private true 2>/dev/null; then
    exec unshare --mount --propagation private /bin/sh -c "$inner" sid-run "$SID" "$nb" "${args[@]}" "$@"
fi

# Fallback (we are ourselves inside a chroot, where / is no mount point and a private
# namespace cannot be made): mount into the shared namespace, once, and leave the
# mounts in place so concurrent runs do not pull them from under each other.
# `sid-run.sh --umount` removes them.
sg_log "no private mount namespace here: using persistent mounts under $SID"
is_mnt() { awk -v d="$1" '$5 == d {f=1} END {exit !f}' /proc/self/mountinfo; }
is_mnt "$SID/dev" || mount --rbind /dev "$SID/dev"
is_mnt "$SID/proc" || mount -t proc proc "$SID/proc"
is_mnt "$SID/sys" || mount --rbind /sys "$SID/sys"
for d in /tmp /var/tmp; do mkdir -p "$SID$d"; is_mnt "$SID$d" || mount --bind "$d" "$SID$d"; done
set -- "${args[@]}" -- "$@"
while [ "$1" != -- ]; do
    mode=$1 p=$(readlink -f "$2"); shift 2
    if [ -d "$p" ]; then mkdir -p "$SID$p"; else mkdir -p "$SID$(dirname "$p")"; [ -e "$SID$p" ] || : > "$SID$p"; fi
    if ! is_mnt "$SID$p"; then
        mount --bind "$p" "$SID$p"
        [ "$mode" = ro ] && mount -o remount,bind,ro "$SID$p"
    fi
done
shift
cwd=$(pwd)
exec chroot "$SID" /bin/sh -c "cd \"\$0\" 2>/dev/null || cd /; exec \"\$@\"" "$cwd" "$@"
