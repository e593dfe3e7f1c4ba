#!/usr/bin/env bash
# Fetch the Debian kernel that linux-image-amd64 currently depends on, unpack it
# into the cache and run depmod. The ABI number (linux-image-6.1.0-NN-amd64) is
# resolved at run time: old ones leave the archive.
#
# Usage: fetch-kernel.sh [--force]
# Prints two lines on stdout:  VMLINUZ=<path>  and  MODULES=<lib/modules/KVER dir>
# (also KVER=<version>). Cache: $SCSIGATE_CACHE/kernel/<package>_<version>/
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../../Deploy/lib.sh"

force=0
case ${1:-} in --force) force=1 ;; "") ;; -h|--help) sed -n '2,9p' "$0"; exit 0 ;; *) sg_die "unknown argument: $1" ;; esac

sg_require_root
sg_lock kernel
sg_apt_install kmod
sg_apt_update

# Name of the real kernel package behind the metapackage.
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -1)
if [ -z "$pkg" ]; then
    pkg=$(apt-cache show linux-image-amd64 | sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*-amd64\).*/\1/p' | head -1)
fi
[ -n "$pkg" ] || sg_die "cannot resolve the package linux-image-amd64 depends on (apt-cache depends linux-image-amd64)"
ver=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
[ -n "$ver" ] && [ "$ver" != "(none)" ] || sg_die "no candidate version for $pkg"

dir="$SCSIGATE_CACHE/kernel/${pkg}_${ver//:/%}"
stamp="$dir/.scsigate-complete"

emit() {
    local kver vmlinuz
    kver=$(cat "$dir/kver")
    vmlinuz="$dir/root/boot/vmlinuz-$kver"
    echo "KVER=$kver"
    echo "VMLINUZ=$vmlinuz"
    echo "MODULES=$dir/root/lib/modules/$kver"
}

if [ $force = 0 ] && [ -f "$stamp" ] && [ -f "$dir/kver" ]; then
    kver=$(cat "$dir/kver")
    if [ -s "$dir/root/boot/vmlinuz-$kver" ] && [ -s "$dir/root/lib/modules/$kver/modules.dep" ]; then
        sg_log "cached kernel $pkg $ver"
        emit; exit 0
    fi
fi

sg_log "fetching $pkg $ver"
rm -rf "$dir"
mkdir -p "$dir/deb" "$dir/root"
chown _apt "$dir/deb" 2>/dev/null || true   # apt-get download drops privileges to _apt
(cd "$dir/deb" && apt-get download "$pkg=$ver" >&2) || sg_die "apt-get download $pkg=$ver failed"
deb=$(ls "$dir"/deb/*.deb | head -1)
dpkg-deb -x "$deb" "$dir/root" || sg_die "dpkg-deb -x $deb failed"
kver=$(ls "$dir/root/lib/modules" | head -1)
[ -n "$kver" ] && [ -s "$dir/root/boot/vmlinuz-$kver" ] || sg_die "unexpected layout in $deb (no boot/vmlinuz or lib/modules)"
depmod -b "$dir/root" "$kver" || sg_die "depmod -b $dir/root $kver failed"
rm -f "$deb"
echo "$kver" > "$dir/kver"
echo "$pkg $ver" > "$stamp"
sg_log "kernel $kver ready in $dir"
# older kernels (the ABI moved on) are dead weight: drop them
for old in "$SCSIGATE_CACHE"/kernel/*/; do
    old=${old%/}
    [ "$old" = "$dir" ] || { sg_log "removing old kernel cache $old"; rm -rf "$old"; }
done
emit
