# Shared helpers for the ScsiGate real-client harness (sourced, not executed).
# Caches live outside the clone so repeated runs are fast.

: "${SCSIGATE_CACHE:=/var/cache/scsigate}"
export SCSIGATE_CACHE

sg_log() { printf '[%s] %s\n' "${0##*/}" "$*" >&2; }
sg_die() { printf '[%s] ERROR: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# sg_guest_cmdline TEST [ARGS...]: the test guest's kernel command line (console on ttyS0, test TEST).
# no_timer_check: under TCG on a loaded host Linux's IO-APIC timer check can fail and panic at boot ("IO-APIC +
# timer doesn't work!", seen 2026-12-03 at load average 18); a VM's timer needs no such check.
sg_guest_cmdline() {
    local test=$1; shift
    echo "console=ttyS0 panic=-1 quiet no_timer_check scsi_mod.scan=sync scsigate.test=$test $*"
}

sg_require_root() {
    [ "$(id -u)" = 0 ] || sg_die "must run as root (apt-get, chroot, mounts)"
}

# apt-get update once per process tree (and at most once an hour), then install
# the named packages if any is missing. Waits for a dpkg lock held by others.
sg_apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    sg_apt_update
    sg_log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y \
        --no-install-recommends "${missing[@]}" >&2 || sg_die "apt-get install ${missing[*]} failed"
}

sg_apt_update() {
    [ -n "${SG_APT_UPDATED:-}" ] && return 0
    local stamp=/var/lib/apt/periodic/scsigate-update-stamp
    if [ -z "$(find "$stamp" -mmin -60 2>/dev/null)" ] || [ ! -d /var/lib/apt/lists ] \
        || [ -z "$(ls /var/lib/apt/lists/*_Packages* 2>/dev/null)" ]; then
        sg_log "apt-get update"
        apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 update >&2 || sg_die "apt-get update failed"
        mkdir -p "${stamp%/*}" && touch "$stamp"
    fi
    export SG_APT_UPDATED=1
}

# Serialize cache builders across concurrent runs: sg_lock NAME (held until the process exits).
sg_lock() {
    mkdir -p "$SCSIGATE_CACHE"
    exec 9>"$SCSIGATE_CACHE/.lock-$1"
    flock -w 1800 9 || sg_die "timed out waiting for the $1 cache lock"
}
