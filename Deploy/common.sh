# Shared helpers for Deploy/run.sh and Deploy/test.sh (sourced, not run).

# Debian packages the build needs (system-library targets): libaio, libiscsi, pkg-config for libiscsi.pc.
SG_BUILD_PACKAGES=(libaio-dev libiscsi-dev pkg-config)

sg_say() { printf '%s\n' "[scsigate] $*" >&2; }
sg_fail() { sg_say "error: $*"; exit 1; }

# Installs the named Debian packages that are missing (apt-get update once, only if something is missing).
sg_install_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || sg_fail "missing packages ${missing[*]} and no apt-get to install them"
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || sg_fail "missing packages ${missing[*]}: run as root to install them"
        sudo="sudo"
    fi
    sg_say "installing ${missing[*]}"
    $sudo apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 update -qq >&2 || sg_fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
        "${missing[@]}" >&2 || sg_fail "apt-get install ${missing[*]} failed"
}

# Swift 6.3 must be on PATH (it is not a Debian package); /opt/swift is checked as well.
sg_require_swift() {
    if ! command -v swift >/dev/null && [ -x /opt/swift/usr/bin/swift ]; then
        export PATH="/opt/swift/usr/bin:$PATH"
    fi
    command -v swift >/dev/null || sg_fail "swift not found: install the Swift 6.3 toolchain (https://www.swift.org/install/linux/) and put it on PATH"
    local version
    version=$(swift --version 2>&1 | sed -n 's/.*Swift version \([0-9]*\.[0-9]*\).*/\1/p' | head -1)
    case "$version" in
        6.[3-9]*|[7-9].*) ;;
        *) sg_fail "Swift $version found; ScsiGate needs Swift 6.3 or later" ;;
    esac
}
