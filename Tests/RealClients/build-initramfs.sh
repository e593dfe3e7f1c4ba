#!/usr/bin/env bash
# Build the guest initramfs: static busybox, kmod + the storage modules of the
# cached Debian kernel, sg3-utils, fio, iscsi-test-cu, blkdiscard with every
# shared library they need, an /init that runs the test named on the kernel
# command line (scsigate.test=NAME -> /tests/NAME.sh, baked in from
# Tests/RealClients/tests/), prints "SCSIGATE-GUEST-EXIT rc=N" and powers off.
#
# Usage: build-initramfs.sh [--force] [--output FILE]
# Prints INITRD=<path> (and the fetch-kernel.sh lines: KVER, VMLINUZ, MODULES).
# The result is cached under $SCSIGATE_CACHE/initramfs/ keyed by a hash of its
# inputs (this script, the tests, the kernel and the package versions).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../../Deploy/lib.sh"

force=0 output=
while [ $# -gt 0 ]; do
    case $1 in
        --force) force=1 ;;
        --output) output=$2; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) sg_die "unknown argument: $1" ;;
    esac
    shift
done

sg_require_root
# host packages whose binaries are copied into the guest
HOST_PKGS=(kmod sg3-utils fio libiscsi-bin util-linux cpio gzip xz-utils libc-bin)
sg_apt_install "${HOST_PKGS[@]}"

kinfo=$("$HERE/fetch-kernel.sh") || sg_die "fetch-kernel.sh failed"
eval "$kinfo"   # KVER VMLINUZ MODULES

# Modules the guest loads at boot (missing ones are skipped; deps come from modules.dep).
BOOT_MODULES="virtio_pci virtio_mmio virtio_scsi virtio_blk vmw_pvscsi scsi_mod sd_mod sg"
# Crypto/CRC helpers that sd_mod's t10-pi asks for through request_module().
EXTRA_MODULES="crct10dif_generic crct10dif_pclmul crc64_rocksoft_generic"

# Binaries copied with their libraries (first found path wins).
BINARIES=(
    /usr/bin/kmod
    /usr/bin/sg_inq /usr/bin/sg_readcap /usr/bin/sg_luns /usr/bin/sg_map /usr/bin/sg_scan
    /usr/bin/sg_vpd /usr/bin/sg_turs /usr/bin/sg_sync /usr/bin/sg_unmap /usr/bin/sg_write_same
    /usr/bin/sg_get_lba_status /usr/bin/sg_modes /usr/bin/sg_requests /usr/bin/sg_rtpg /usr/bin/sg_reset
    /usr/bin/fio /usr/bin/iscsi-test-cu
    /usr/sbin/blkdiscard /usr/bin/lsblk
)

sg_lock initramfs
# ---- busybox-static, downloaded (not installed: it conflicts with busybox) ----
bb_ver=$(apt-cache policy busybox-static | sed -n 's/^ *Candidate: //p')
[ -n "$bb_ver" ] && [ "$bb_ver" != "(none)" ] || { sg_apt_update; bb_ver=$(apt-cache policy busybox-static | sed -n 's/^ *Candidate: //p'); }
bb_dir="$SCSIGATE_CACHE/busybox/${bb_ver//:/%}"
if [ ! -x "$bb_dir/root/bin/busybox" ]; then
    rm -rf "$bb_dir"; mkdir -p "$bb_dir/deb"
    chown _apt "$bb_dir/deb" 2>/dev/null || true
    (cd "$bb_dir/deb" && apt-get download "busybox-static=$bb_ver" >&2) || sg_die "apt-get download busybox-static failed"
    dpkg-deb -x "$bb_dir"/deb/*.deb "$bb_dir/root"
    rm -rf "$bb_dir/deb"
    [ -x "$bb_dir/root/bin/busybox" ] || sg_die "busybox-static package has no bin/busybox"
fi
BUSYBOX="$bb_dir/root/bin/busybox"

# ---- cache key ----
key=$( {
    cat "$0" "$HERE/init.sh"
    find "$HERE/tests" -type f | LC_ALL=C sort | xargs cat
    echo "$KVER $bb_ver"
    dpkg-query -W "${HOST_PKGS[@]}" libc6
    } | sha256sum | cut -c1-16)
out_dir="$SCSIGATE_CACHE/initramfs"
cached="$out_dir/guest-$KVER-$key.cpio.gz"
mkdir -p "$out_dir"
if [ $force = 1 ] || [ ! -s "$cached" ]; then
    work=$(mktemp -d "$out_dir/build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    root="$work/root"
    mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,etc,proc,sys,dev,tmp,run,mnt,root,tests}
    ln -s usr/bin "$root/bin"; ln -s usr/sbin "$root/sbin"; ln -s usr/lib "$root/lib"; ln -s usr/lib64 "$root/lib64"

    # busybox and its applets (do not shadow real binaries copied below)
    cp "$BUSYBOX" "$root/usr/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        [ -e "$root/usr/bin/$applet" ] || ln -s busybox "$root/usr/bin/$applet"
    done

    # binaries + shared libraries (ldd closure, loader included), copied to /usr/...
    copy_file() {  # copy_file HOSTPATH -> same path under /usr in the guest, dereferenced
        local src=$1 rel dst
        rel=$(readlink -f "$src"); rel=${rel#/usr}
        dst="$root/usr$rel"
        mkdir -p "$(dirname "$dst")"
        [ -e "$dst" ] && [ ! -L "$dst" ] || { rm -f "$dst"; cp -L "$src" "$dst"; }
        # keep the name the loader asks for (soname symlink) as well
        local want=${src#/usr}
        if [ "$want" != "$rel" ] && [ ! -e "$root/usr$want" ]; then
            mkdir -p "$(dirname "$root/usr$want")"; cp -L "$src" "$root/usr$want"
        fi
    }
    for b in "${BINARIES[@]}"; do
        [ -x "$b" ] || { sg_log "warning: $b not found on host, skipped"; continue; }
        rm -f "$root/usr/${b#/usr/}"
        copy_file "$b"
        ldd "$b" | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' | while read -r lib; do copy_file "$lib"; done
    done
    for l in modprobe insmod rmmod lsmod modinfo depmod; do ln -sf ../bin/kmod "$root/usr/sbin/$l"; rm -f "$root/usr/bin/$l"; done
    # ld.so search path for libraries in subdirectories (e.g. ceph/)
    find "$root/usr/lib/x86_64-linux-gnu" -mindepth 1 -type d | sed "s|^$root||" > "$root/etc/ld.so.conf"
    echo /usr/lib/x86_64-linux-gnu >> "$root/etc/ld.so.conf"
    ldconfig -r "$root" 2>/dev/null || sg_log "warning: ldconfig -r failed (libraries in default paths still load)"

    # kernel modules: closure over modules.dep, then depmod inside the image
    kroot=${MODULES%/lib/modules/*}
    mods=$(for m in $BOOT_MODULES $EXTRA_MODULES; do
        modprobe -d "$kroot" -S "$KVER" --show-depends "$m" 2>/dev/null | awk '$1=="insmod"{print $2}'
    done | sort -u)
    [ -n "$mods" ] || sg_die "no modules resolved from $MODULES"
    for f in $mods; do
        rel=${f#"$kroot"}; rel=${rel#/usr}
        mkdir -p "$root/usr$(dirname "$rel")"
        case $f in
            *.ko.xz) xz -dc "$f" > "$root/usr${rel%.xz}" ;;
            *.ko.zst) zstd -dcq "$f" > "$root/usr${rel%.zst}" ;;
            *.ko.gz) gzip -dc "$f" > "$root/usr${rel%.gz}" ;;
            *) cp "$f" "$root/usr$rel" ;;
        esac
    done
    cp "$MODULES"/modules.order "$MODULES"/modules.builtin* "$root/usr/lib/modules/$KVER/" 2>/dev/null || true
    depmod -b "$root" "$KVER" || sg_die "depmod in the initramfs tree failed"
    echo "$BOOT_MODULES" > "$root/etc/scsigate-modules"

    # init, tests
    install -m 0755 "$HERE/init.sh" "$root/init"
    cp -r "$HERE/tests/." "$root/tests/"
    chmod -R a+rX "$root/tests"; find "$root/tests" -name '*.sh' -exec chmod 0755 {} +
    echo "$KVER" > "$root/etc/scsigate-kver"
    printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
    printf 'root:x:0:\n' > "$root/etc/group"

    (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) | gzip -1 > "$work/out.cpio.gz"
    mv "$work/out.cpio.gz" "$cached"
    # keep only the newest few images
    ls -1t "$out_dir"/guest-*.cpio.gz 2>/dev/null | tail -n +4 | xargs -r rm -f
    sg_log "built $cached ($(du -h "$cached" | cut -f1))"
else
    sg_log "cached initramfs $cached"
fi
if [ -n "$output" ]; then cp "$cached" "$output"; cached=$output; fi
echo "$kinfo"
echo "INITRD=$cached"
