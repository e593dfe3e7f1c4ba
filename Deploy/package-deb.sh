#!/usr/bin/env bash
# Builds a Debian package of ScsiGate: Deploy/package-deb.sh [--output DIR]
#   - `swift build -c release --static-swift-stdlib`: the Swift runtime and Foundation are linked in, so the
#     package needs no Swift toolchain (ldd lists only C libraries; checked below);
#   - /usr/bin/scsigate (debug info stripped, symbols kept for backtraces), the systemd units
#     (Deploy/scsigate.service, and Deploy/scsigate.socket when present) in /lib/systemd/system with the
#     binary's path set to /usr/bin, the default config /etc/scsigate/scsigate.toml (a conffile: kept on
#     upgrade and remove, removed on purge), Config/examples and the libvirt domain templates with render.sh
#     under /usr/share/doc/scsigate and /usr/share/scsigate/libvirt, a man page scsigate(1) generated from the
#     command definitions (`scsigate --experimental-dump-help` through Deploy/help-to-man.py) and bash, zsh
#     and fish completions (`scsigate --generate-completion-script`);
#   - Depends from dpkg-shlibdeps (libaio1, libiscsi7, libc6, libgcc-s1, libstdc++6 with versions).
# The service is not enabled or started by the package: edit /etc/scsigate/scsigate.toml, then
# `systemctl enable --now scsigate`.
# The last line of stdout is the path of the .deb (default directory: .build/deb).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
source Deploy/lib.sh

out="$ROOT/.build/deb"
while [ $# -gt 0 ]; do
    case $1 in
        --output) out=$2; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) sg_die "unknown argument: $1" ;;
    esac
    shift
done
mkdir -p "$out"; out=$(cd "$out" && pwd)

sg_apt_install "${SG_BUILD_PACKAGES[@]}" dpkg-dev binutils python3
sg_require_swift
sg_log "swift build -c release --static-swift-stdlib --product scsigate"
swift build -c release --static-swift-stdlib --product scsigate >&2 || sg_die "release build failed"
bin="$(swift build -c release --static-swift-stdlib --show-bin-path)/scsigate"
if ldd "$bin" | grep -E 'libswift|libFoundation|libdispatch|libBlocksRuntime|not found' >&2; then
    sg_die "$bin links the Swift runtime dynamically or misses a library (listed above)"
fi

version=$("$bin" version | awk '{print $2}')
arch=$(dpkg --print-architecture)
stage=$(sg_tempdir deb)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/scsigate"
install -d "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" "$pkg/etc/scsigate" \
    "$pkg/usr/share/man/man1" "$pkg/usr/share/doc/scsigate/examples" "$pkg/usr/share/scsigate/libvirt" \
    "$pkg/usr/share/bash-completion/completions" "$pkg/usr/share/zsh/vendor-completions" \
    "$pkg/usr/share/fish/vendor_completions.d"

strip --strip-debug -o "$pkg/usr/bin/scsigate" "$bin"
chmod 0755 "$pkg/usr/bin/scsigate"
for unit in Deploy/scsigate.service Deploy/scsigate.socket; do
    [ -f "$unit" ] || continue
    sed 's|/usr/local/bin/scsigate|/usr/bin/scsigate|g; s|/usr/local/share/doc/scsigate|/usr/share/doc/scsigate|g' \
        "$unit" > "$pkg/lib/systemd/system/${unit##*/}"
done
install -m 0644 Config/scsigate.toml "$pkg/etc/scsigate/scsigate.toml"
install -m 0644 Config/examples/*.toml "$pkg/usr/share/doc/scsigate/examples/"
install -m 0644 README.md "$pkg/usr/share/doc/scsigate/README.md"
install -m 0644 Deploy/libvirt/*.xml "$pkg/usr/share/scsigate/libvirt/"
install -m 0755 Deploy/libvirt/render.sh "$pkg/usr/share/scsigate/libvirt/render.sh"

"$bin" --experimental-dump-help | python3 Deploy/help-to-man.py --version "$version" \
    --date "$(date -u -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)" +%F)" | gzip -9n > "$pkg/usr/share/man/man1/scsigate.1.gz"
"$bin" --generate-completion-script bash > "$pkg/usr/share/bash-completion/completions/scsigate"
"$bin" --generate-completion-script zsh > "$pkg/usr/share/zsh/vendor-completions/_scsigate"
"$bin" --generate-completion-script fish > "$pkg/usr/share/fish/vendor_completions.d/scsigate.fish"

# Depends: what the binary links, as dpkg-shlibdeps resolves it (it wants a debian/control to read).
mkdir -p "$stage/debian"
printf 'Source: scsigate\n\nPackage: scsigate\nArchitecture: any\n' > "$stage/debian/control"
depends=$(cd "$stage" && dpkg-shlibdeps -O "$pkg/usr/bin/scsigate" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$depends" ] || sg_die "dpkg-shlibdeps found no dependencies for $pkg/usr/bin/scsigate"

echo /etc/scsigate/scsigate.toml > "$pkg/DEBIAN/conffiles"
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: scsigate
Version: $version
Architecture: $arch
Maintainer: ScsiGate maintainers <scsigate@localhost>
Installed-Size: $(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
Depends: $depends
Suggests: qemu-system-x86, libvirt-daemon-driver-qemu
Section: admin
Priority: optional
Description: user-space storage target gateway for QEMU guests
 ScsiGate serves guest disks to QEMU over vhost-user (virtio-scsi, virtio-blk) and
 vfio-user (VMware PVSCSI), backed by raw files, block devices or remote iSCSI LUNs.
 The LUN map is TOML (/etc/scsigate/scsigate.toml); an admin CLI adds, removes and
 resizes LUNs of the running gateway. The package ships systemd units (not enabled),
 libvirt domain templates, a man page and shell completions.
CONTROL
# systemd learns about the units; nothing is enabled or started (the config must be edited first).
for script in postinst postrm; do
    cat > "$pkg/DEBIAN/$script" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
SCRIPT
done
cat > "$pkg/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop scsigate.service scsigate.socket >/dev/null 2>&1 || true
fi
SCRIPT
chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/postrm" "$pkg/DEBIAN/prerm"

deb="$out/scsigate_${version}_${arch}.deb"
# gzip: about 10 s for the 76 MB binary here (xz -6: 90 s for a 35 % smaller file)
dpkg-deb --root-owner-group -Zgzip --build "$pkg" "$deb" >&2
sg_log "built $deb ($(du -h "$deb" | cut -f1); Depends: $depends)"
echo "$deb"
