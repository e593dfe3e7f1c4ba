#!/usr/bin/env bash
# Runs every ScsiGate test on this machine:
#   1. installs missing Debian packages (libaio-dev, libiscsi-dev, pkg-config; systemd for systemd-socket-activate),
#   2. swift build of every target and test target; any compiler warning fails the run,
#   3. swift test: all unit and protocol tests (XCTest, then Swift Testing with its summary),
#   3b. every libFuzzer target for a few seconds (Tests/Fuzz/fuzz.sh --all),
#   4. the real-client suites (QEMU guests, tgtd) through Tests/RealClients/ci.sh; they need root
#      (chroot, mounts, loop devices, tgtd), so a non-root run skips them with one line saying so.
# CI runs this through .ci/run (as root, no stdin, CI=true), and so runs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
source Deploy/lib.sh

sg_apt_install "${SG_BUILD_PACKAGES[@]}"
# systemd-socket-activate (Debian package systemd) for the socket-activation test of the executable.
sg_apt_install systemd
sg_require_swift

logs=$(sg_tempdir test)
trap 'rm -rf "$logs"' EXIT

sg_log "swift build (warnings are errors)"
set +e
swift build --build-tests 2>&1 | tee "$logs/build.log"
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || sg_die "swift build failed (exit $status)"
if grep -n "warning:" "$logs/build.log" >&2; then
    sg_die "swift build produced warnings (listed above)"
fi

sg_log "swift test"
set +e
swift test 2>&1 | tee "$logs/test.log"
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || sg_die "swift test failed (exit $status)"
grep -Eq "Test run with [0-9]+ tests? .*passed" "$logs/test.log" || sg_die "swift test printed no Swift Testing summary"

# Every libFuzzer target briefly (one sanitizer build into .build/fuzz, then a few seconds each; a crash, leak
# or timeout fails the run and leaves its reproducer): Tests/Fuzz/fuzz.sh, README "Fuzzing".
sg_log "fuzz targets: Tests/Fuzz/fuzz.sh --all ${SCSIGATE_FUZZ_SECONDS:-4}"
bash Tests/Fuzz/fuzz.sh --all "${SCSIGATE_FUZZ_SECONDS:-4}" || sg_die "a fuzz target found a crash, leak or timeout (reproducer path above)"

if ! sg_is_root; then
    sg_log "unit tests passed; real-client suites NOT RUN: Tests/RealClients/ci.sh needs root (QEMU guests in a chroot, mounts, loop devices, tgtd): run Deploy/test.sh as root for them"
    exit 0
else
    sg_log "real-client suites: Tests/RealClients/ci.sh"
    bash Tests/RealClients/ci.sh
fi
sg_log "all tests passed"
