# The one shell helper library of ScsiGate's scripts (sourced, not run): Deploy/run.sh, Deploy/test.sh,
# Deploy/package-deb.sh, Deploy/libvirt/, the real-client harness (Tests/RealClients), Tests/Fuzz/fuzz.sh
# and the benchmark scripts (Benchmarks/). One way to log, fail, check for root, install packages, wait,
# make a scratch directory and lock a cache.

# Debian packages the build needs (system-library targets): libaio, libiscsi, pkg-config for libiscsi.pc.
SG_BUILD_PACKAGES=(libaio-dev libiscsi-dev pkg-config)

# Caches of the real-client harness (kernel, initramfs, chroots) live outside the clone so repeated runs are fast.
: "${SCSIGATE_CACHE:=/var/cache/scsigate}"
export SCSIGATE_CACHE

# sg_log MESSAGE...: one line on stderr, prefixed with the script's name.
sg_log() { printf '[%s] %s\n' "${0##*/}" "$*" >&2; }
# sg_die MESSAGE...: logs "ERROR: MESSAGE" and exits 1.
sg_die() { sg_log "ERROR: $*"; exit 1; }

# sg_is_root: whether this process runs as root.
sg_is_root() { [ "$(id -u)" = 0 ]; }
# sg_require_root [WHY]: dies unless root, saying why root is needed.
sg_require_root() { sg_is_root || sg_die "must run as root (${1:-apt-get, chroot, mounts})"; }

# sg_apt_install PACKAGE...: installs the named Debian packages that are missing (through sudo when not
# root). apt-get update runs at most once per process tree and once an hour; a dpkg lock held by
# others is waited for.
sg_apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null || sg_die "missing packages ${missing[*]} and no apt-get to install them"
    sg_apt_update
    sg_log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $(sg_sudo) apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "${missing[@]}" >&2 || sg_die "apt-get install ${missing[*]} failed"
}

# sg_apt_update: apt-get update unless this process tree did already or it ran in the last hour.
sg_apt_update() {
    [ -n "${SG_APT_UPDATED:-}" ] && return 0
    local stamp=/var/lib/apt/periodic/scsigate-update-stamp
    if [ -z "$(find "$stamp" -mmin -60 2>/dev/null)" ] || [ -z "$(ls /var/lib/apt/lists/*_Packages* 2>/dev/null)" ]; then
        sg_log "apt-get update"
        $(sg_sudo) apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 update -qq >&2 || sg_die "apt-get update failed"
        $(sg_sudo) mkdir -p "${stamp%/*}" && $(sg_sudo) touch "$stamp"
    fi
    export SG_APT_UPDATED=1
}

# sg_sudo: prints "sudo" when not root (dies when there is no sudo), nothing as root.
sg_sudo() {
    sg_is_root && return 0
    command -v sudo >/dev/null || sg_die "not root and no sudo: run as root to install packages"
    echo sudo
}

# sg_require_swift: Swift 6.3 or later on PATH (it is not a Debian package); /opt/swift is checked as well.
sg_require_swift() {
    if ! command -v swift >/dev/null && [ -x /opt/swift/usr/bin/swift ]; then
        export PATH="/opt/swift/usr/bin:$PATH"
    fi
    command -v swift >/dev/null || sg_die "swift not found: install the Swift 6.3 toolchain (https://www.swift.org/install/linux/) and put it on PATH"
    local version
    version=$(swift --version 2>&1 | sed -n 's/.*Swift version \([0-9]*\.[0-9]*\).*/\1/p' | head -1)
    case "$version" in
        6.[3-9]*|[7-9].*) ;;
        *) sg_die "Swift $version found; ScsiGate needs Swift 6.3 or later" ;;
    esac
}

# sg_wait SECONDS COMMAND...: runs COMMAND every 0.1 s until it succeeds (returns 0) or SECONDS (whole
# seconds) have passed (returns 1). The one way the scripts wait for a socket, a daemon or a log line.
sg_wait() {
    local end=$(( $(date +%s%N) / 1000000 + $1 * 1000 ))
    shift
    until "$@"; do
        [ $(( $(date +%s%N) / 1000000 )) -lt "$end" ] || return 1
        sleep 0.1
    done
}

# sg_tempdir NAME: makes and prints a fresh scratch directory /var/tmp/scsigate-NAME.XXXXXX (the caller
# removes it, usually in its EXIT trap). /var/tmp, not /tmp: guests' disk images go there.
sg_tempdir() { mktemp -d "/var/tmp/scsigate-$1.XXXXXX" || sg_die "mktemp -d /var/tmp/scsigate-$1.XXXXXX failed"; }

# sg_lock NAME: serializes cache builders across concurrent runs (held until the process exits).
sg_lock() {
    mkdir -p "$SCSIGATE_CACHE"
    exec 9>"$SCSIGATE_CACHE/.lock-$1"
    flock -w 1800 9 || sg_die "timed out waiting for the $1 cache lock"
}

# sg_guest_cmdline TEST [ARGS...]: the test guest's kernel command line (console on ttyS0, test TEST).
# no_timer_check: under TCG on a loaded host Linux's IO-APIC timer check can fail and panic at boot ("IO-APIC +
# timer doesn't work!", seen 2026-12-03 at load average 18); a VM's timer needs no such check.
sg_guest_cmdline() {
    local test=$1; shift
    echo "console=ttyS0 panic=-1 quiet no_timer_check scsi_mod.scan=sync scsigate.test=$test $*"
}
