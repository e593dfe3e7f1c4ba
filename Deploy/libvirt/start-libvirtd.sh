#!/usr/bin/env bash
# Start libvirtd 9.x (Debian bookworm) and virtlogd on a machine without systemd, for the QEMU driver
# (qemu:///system) with QEMU running as root and no security driver.
#
# Usage: start-libvirtd.sh [--stop-file FILE]
#   Creates what the daemons need (run/log/lib/cache directories, the groups kvm and libvirt-qemu and the
#   user libvirt-qemu, which libvirtd resolves before it reads qemu.conf), writes /etc/libvirt/qemu.conf
#   when it is absent or was written by this script, then `virtlogd -d; libvirtd -d` unless they run.
#   With --stop-file FILE, it writes a script that stops exactly the daemons it started (nothing when both
#   were running already): `bash FILE` stops them and exits 0 once they are gone.
# Installs libvirt-daemon, libvirt-daemon-driver-qemu and libvirt-clients when missing.
# Prints the library and hypervisor versions (virsh version) and which daemons it started.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../lib.sh"
stopfile=
while [ $# -gt 0 ]; do
    case $1 in
        --stop-file) stopfile=$2; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) sg_die "unknown argument: $1" ;;
    esac
    shift
done
sg_require_root
sg_apt_install libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86

mkdir -p /var/run/libvirt /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt/qemu
getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd --system --gid libvirt-qemu --groups kvm \
    --home-dir /var/lib/libvirt --no-create-home --shell /usr/sbin/nologin libvirt-qemu

conf=/etc/libvirt/qemu.conf marker="# written by ScsiGate Deploy/libvirt/start-libvirtd.sh"
if [ ! -e "$conf" ] || head -1 "$conf" | grep -qF "$marker"; then
    cat > "$conf" <<CONF
$marker
# QEMU runs as root without a security driver: it can open ScsiGate's sockets (mode 0600, root) and the
# kernel/initrd/console files wherever they are. Use socket_mode/socket_group in the gateway config instead
# when QEMU runs as libvirt-qemu.
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
CONF
else
    for k in 'user = "root"' 'group = "root"' 'dynamic_ownership = 0' 'security_driver = "none"'; do
        grep -qx "$k" "$conf" || sg_die "$conf exists and lacks the line '$k' (needed here; move the file away to let this script write it)"
    done
fi

started=()
if ! pgrep -x virtlogd >/dev/null; then
    virtlogd -d || sg_die "virtlogd -d failed"
    started+=(virtlogd)
fi
if ! pgrep -x libvirtd >/dev/null; then
    libvirtd -d || sg_die "libvirtd -d failed"
    started+=(libvirtd)
fi
sg_wait 20 virsh -c qemu:///system version >/dev/null 2>&1 || true
v=$(virsh -c qemu:///system version 2>&1) || sg_die "libvirtd does not answer: $v"
if [ -n "$stopfile" ]; then
    # the pids of exactly the daemons started here, libvirtd first; the file's status is 0 once they are gone
    pids=""
    for d in libvirtd virtlogd; do
        case " ${started[*]:-} " in *" $d "*) pids="$pids $(cat "/var/run/$d.pid")" ;; esac
    done
    cat > "$stopfile" <<STOP
# written by start-libvirtd.sh: stops the daemons it started (pids:${pids:- none})
for p in$pids; do kill "\$p" 2>/dev/null; for _ in \$(seq 1 100); do kill -0 "\$p" 2>/dev/null || break; sleep 0.1; done; done
for p in$pids; do kill -0 "\$p" 2>/dev/null && exit 1; done
exit 0
STOP
fi
echo "$(printf '%s\n' "$v" | sed -n 's/^Using library: //p'), $(printf '%s\n' "$v" | sed -n 's/^Running hypervisor: //p')${started[*]:+ (started: ${started[*]})}"
