#!/usr/bin/env bash
# Real-client suites: ScsiGate itself (`scsigate serve`) attached to real QEMU guests running Linux's
# own drivers, plus the real iSCSI target tgtd. Called by Deploy/test.sh after `swift build`/`swift test`.
#
#   pvscsi           QEMU 11 (sid chroot) vfio-user-pci + vmw_pvscsi: identity, iscsi-test-cu SCSI
#                    (<= 7 failures), fio verify, byte check in the backing file, CLI hotplug
#   vhost-user-scsi  QEMU 7.2 vhost-user-scsi-pci + virtio_scsi: the same, CLI hotplug/resize
#   vhost-user-blk   QEMU 7.2 vhost-user-blk-pci + virtio_blk: fio verify, byte check, discard
#                    and write-zeroes reaching the file (holes)
#   vhost-user-blk-resize  QEMU 11 vhost-user-blk-pci: CLI resize seen by virtio_blk (config change)
#   vhost-user-blk-reconnect  QEMU 7.2 vhost-user-blk, gateway SIGKILLed and restarted under fio verify
#   vhost-user-memhotplug  QEMU 7.2 pc-dimm hotplug under a vhost-user-scsi disk (ADD_MEM_REG), fio verify
#   iscsi            a LUN backed by tgtd over iSCSI, served through virtio-scsi: conformance, fio
#
# Usage: ci.sh [SUITE...]   (default: all). Ends with "real-client: N passed, M failed".
# Environment: SCSIGATE_CI_MAX_FAILED (default 7) conformance failures allowed per suite; SCSIGATE_BIN the
# scsigate binary to test (default: this checkout's swift build).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/Tests/RealClients"
. "$ROOT/Deploy/lib.sh"
sg_require_root
cd "$ROOT"

MAXF=${SCSIGATE_CI_MAX_FAILED:-7}
# Guest tests of the SCSI suites' main run (override only when developing the harness).
SCSI_TESTS=${SCSIGATE_CI_SCSI_TESTS:-smoke,conformance,fio-verify,fio-randread,pattern}
BIN=${SCSIGATE_BIN:-"$(swift build --show-bin-path)/scsigate"}   # SCSIGATE_BIN: another build of the gateway
[ -x "$BIN" ] || { swift build >&2 || sg_die "swift build failed"; }
WORK=$(sg_tempdir ci)
GW_PID=""
pass=0 fail=0
failed_checks=()

cleanup() {
    stop_gateway
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

check() {  # check NAME STATUS
    if [ "$2" = 0 ]; then
        pass=$((pass + 1)); echo "real-client: $1 OK"
    else
        fail=$((fail + 1)); failed_checks+=("$1"); echo "real-client: $1 FAILED (status $2)"
    fi
}

# guest_run ARGS...: run-guest.sh; when the guest kernel panicked before its init ran (a boot failure of the guest
# under TCG, before any of the gateway's devices is probed: they are probed by the init's modprobe), run it once
# more and say so. Every retry is printed and counted. A guest that hangs is not retried: firmware (SeaBIOS probes
# virtio and PVSCSI disks) and the drivers' probe talk to the gateway, so a hang there is the gateway's to find.
RETRIES=0
guest_run() {
    local log="" a rc
    for a in "$@"; do [ "${prev:-}" = --log ] && log=$a; prev=$a; done
    bash "$HERE/run-guest.sh" "$@"; rc=$?
    if [ "$rc" -ge 124 ] && [ -n "$log" ] && tr -d '\r' < "$log" | grep -a 'Kernel panic' >/dev/null \
        && ! tr -d '\r' < "$log" | grep -a '^scsigate-guest: kernel' >/dev/null; then
        RETRIES=$((RETRIES + 1))
        echo "real-client: RETRY: the guest kernel panicked before its init ran (rc $rc, log kept as $log.stalled)"
        mv "$log" "$log.stalled"
        bash "$HERE/run-guest.sh" "$@"; rc=$?
    fi
    return $rc
}

# start_gateway CONFIG LOG: serve CONFIG in the background, wait for its sockets.
start_gateway() {
    "$BIN" check-config "$1" >&2 || return 1
    "$BIN" serve --config "$1" >"$2" 2>&1 &
    GW_PID=$!
    local i
    for i in $(seq 1 100); do
        grep -q "running; stop with SIGTERM" "$2" 2>/dev/null && return 0
        kill -0 "$GW_PID" 2>/dev/null || { cat "$2" >&2; GW_PID=""; return 1; }
        sleep 0.2
    done
    cat "$2" >&2
    return 1
}

# stop_gateway: SIGTERM, the gateway must drain and exit 0 within 30 s.
stop_gateway() {
    [ -n "$GW_PID" ] || return 0
    local pid=$GW_PID rc
    GW_PID=""
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid"; wait "$pid" 2>/dev/null; return 1
    fi
    wait "$pid"; rc=$?
    return $rc
}

gateway_header() {  # gateway_header DIR
    cat <<TOML
[gateway]
state_dir = "$1/state"
control_socket = "$1/control.sock"
log_level = "info"
TOML
}

cli() { "$BIN" "$@" --socket "$DIR/control.sock"; }

# one_controller NAME TRANSPORT CONTROLLER-KEYS LUN-KEYS: writes DIR/gw.toml serving one controller NAME
# on DIR/NAME.sock with one LUN (each KEYS argument: TOML key lines, may be empty).
one_controller() {
    { gateway_header "$DIR"
      printf '\n[[controller]]\nname = "%s"\ntransport = "%s"\nsocket = "%s"\n' "$1" "$2" "$DIR/$1.sock"
      [ -z "$3" ] || printf '%s\n' "$3"
      printf '\n[[controller.lun]]\n%s\n' "$4"
    } > "$DIR/gw.toml"
}

# file_lun FILE SIZE [KEY-LINES]: the key lines of a file LUN created sparse at DIR/FILE.
file_lun() { printf 'backend = "file"\npath = "%s"\nsize = "%s"\ncreate = true' "$DIR/$1" "$2"; [ -z "${3:-}" ] || printf '\n%s' "$3"; }

# serve NAME: starts the gateway on DIR/gw.toml (log DIR/gw.log) and checks "NAME gateway start".
serve() { start_gateway "$DIR/gw.toml" "$DIR/gw.log"; check "$1 gateway start" $?; }

# report_iops NAME LOG: the guest's fio 4 KiB random read figure.
report_iops() {
    local line
    line=$(grep -a '^SCSIGATE-IOPS' "$2" | tail -1 | tr -d '\r')
    if [ -n "$line" ]; then echo "[$1] ${line#SCSIGATE-IOPS }"; check "$1 fio 4k randread" 0; else check "$1 fio 4k randread" 1; fi
}

# conformance_check NAME LOG: iscsi-test-cu ran completely with at most MAXF failures.
conformance_check() {
    local out rc
    out=$(bash "$HERE/summarize-cunit.sh" "$2" --max-failed "$MAXF"); rc=$?
    printf '%s\n' "$out" | grep -v '^SKIPPED:' | sed "s/^/[$1] /"
    check "$1 conformance (<= $MAXF failed)" $rc
}

suite_pvscsi() {
    DIR="$WORK/pvscsi"; mkdir -p "$DIR"
    { gateway_header "$DIR"; cat <<TOML

[[controller]]
name = "pv0"
transport = "pvscsi"
socket = "$DIR/pv0.sock"

[[controller.lun]]
target = 0
lun = 0
backend = "file"
path = "$DIR/pv0.img"
size = "256M"
create = true
serial = "SGCI-PV0"

[[controller]]
name = "pv24"
transport = "pvscsi"
socket = "$DIR/pv24.sock"
max_targets = 24

[[controller.lun]]
target = 0
backend = "null"
size = "64M"
TOML
    } > "$DIR/gw.toml"
    start_gateway "$DIR/gw.toml" "$DIR/gw.log"; check "pvscsi gateway start" $? || return
    guest_run --sid --quiet --test multi --log "$DIR/guest.log" --timeout 900 --bind "$DIR" \
        --append "scsigate.tests=$SCSI_TESTS scsigate.vendor=SCSIGATE scsigate.expect_serial=SGCI-PV0 scsigate.expect_size=268435456" \
        -- -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$DIR/pv0.sock\",\"type\":\"unix\"}}"
    check "pvscsi guest smoke+conformance+fio-verify+pattern" $?
    conformance_check pvscsi "$DIR/guest.log"
    report_iops pvscsi "$DIR/guest.log"
    bash "$HERE/check-pattern.sh" "$DIR/guest.log" "$DIR/pv0.img"; check "pvscsi bytes identical in the backing file" $?
    pvscsi_variants
    GUEST_OPTS=(--sid --bind "$DIR")
    HOTPLUG_RESIZE=0 hotplug_run pvscsi pv0 "--target 1" \
        -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$DIR/pv0.sock\",\"type\":\"unix\"}}"
    cycles_with_guest pvscsi pv0 "--target 2" \
        -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$DIR/pv0.sock\",\"type\":\"unix\"}}"
    stop_gateway; check "pvscsi gateway drains and exits 0 on SIGTERM" $?
}

# pvscsi_variants: the same gateway with other guest set-ups. Each prints its figures and counts as checks.
pvscsi_variants() {
    local dev="{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$DIR/pv0.sock\",\"type\":\"unix\"}}"
    local from
    # A LUN at target 20 is visible only if the CONFIG command answered (controller pv24, max_targets 24): the
    # adapter makes QEMU send register writes synchronously, so the default command line (no
    # x-no-posted-writes) works. Its fio figure shows what the round trip per kick costs.
    cli lun add pv24 --target 20 --backend file --path "$DIR/pv20.img" --size 64M --create --serial SGCI-PV20 >/dev/null
    check "pvscsi CLI lun add at target 20" $?
    guest_run --sid --quiet --test multi --log "$DIR/target20.log" --timeout 300 --bind "$DIR" \
        --append "scsigate.tests=smoke,fio-randread scsigate.vendor=SCSIGATE scsigate.expect_serial=SGCI-PV20 scsigate.runtime=10" \
        -- -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$DIR/pv24.sock\",\"type\":\"unix\"}}"
    grep -aq 'serial=SGCI-PV20' "$DIR/target20.log"
    check "pvscsi CONFIG answered on the default QEMU command line (target 20 visible)" $?
    grep -a '^SCSIGATE-IOPS' "$DIR/target20.log" | tail -1 | tr -d '\r' | sed 's/^SCSIGATE-IOPS /[pvscsi-max-targets-24 synchronous register writes] /'
    cli lun remove pv24 --target 20 >/dev/null; check "pvscsi CLI lun remove at target 20" $?
    # Guest RAM without an fd (plain -m): rings, SG lists and data travel as DMA_READ/DMA_WRITE messages.
    from=$(wc -l < "$DIR/gw.log")
    guest_run --sid --plain-memory --quiet --test multi --log "$DIR/plain.log" --timeout 900 --bind "$DIR" \
        --append "scsigate.tests=smoke,fio-verify scsigate.vendor=SCSIGATE scsigate.expect_serial=SGCI-PV0 scsigate.size=8M" \
        -- -device "$dev"
    check "pvscsi guest RAM without fd (DMA by message): smoke+fio-verify" $?
    grep -a '^\[fio-verify\] fio' "$DIR/plain.log" | tr -d '\r' | sed 's/^/[pvscsi-plain-memory] /'
    tail -n +"$((from + 1))" "$DIR/gw.log" | grep -a 'DMA by message so far' | tail -1 | sed 's/^.*vfio-user: /[pvscsi-plain-memory] /'
    # Legacy INTx (vmw_pvscsi without MSI-X and MSI), then MSI (without MSI-X): smoke and a short fio verify each;
    # the gateway log of the run shows which eventfd the client installed (QEMU adds MSI/MSI-X ones only when
    # the guest enables them; the INTx one always).
    pvscsi_irq_run INTx "vmw_pvscsi.disable_msix=1 vmw_pvscsi.disable_msi=1" 'interrupt eventfd for INTx' \
        'interrupt eventfd for MSI' "INTx only (no MSI or MSI-X eventfd)"
    pvscsi_irq_run MSI "vmw_pvscsi.disable_msix=1" 'interrupt eventfd for MSI vector' \
        'interrupt eventfd for MSI-X' "MSI (no MSI-X eventfd)"
}

# pvscsi_irq_run MODE KERNEL-ARGS SEEN NOT-SEEN WHAT: a smoke + short fio verify guest with those vmw_pvscsi
# options; the gateway log of its run must show SEEN and not NOT-SEEN.
pvscsi_irq_run() {
    local from log="$DIR/$(echo "$1" | tr 'A-Z' 'a-z').log"
    from=$(wc -l < "$DIR/gw.log")
    guest_run --sid --quiet --test multi --log "$log" --timeout 600 --bind "$DIR" \
        --append "scsigate.tests=smoke,fio-verify scsigate.vendor=SCSIGATE scsigate.expect_serial=SGCI-PV0 scsigate.size=8M $2" \
        -- -device "$dev"
    check "pvscsi guest with $1 ($2): smoke+fio-verify" $?
    tail -n +"$((from + 1))" "$DIR/gw.log" | grep "$3" >/dev/null && ! tail -n +"$((from + 1))" "$DIR/gw.log" | grep "$4" >/dev/null
    check "pvscsi $1 run used $5" $?
}

# hotplug_run NAME CONTROLLER ADDRESS-ARGS QEMU-ARGS...: while a guest runs, add a LUN with the CLI, see it
# appear (no rescan), optionally resize it (HOTPLUG_RESIZE=1), remove it, see it disappear; then 100
# add/remove cycles with the gateway's fd count and RSS before and after.
hotplug_run() {
    local name=$1 ctl=$2 addr=$3; shift 3
    local resize=${HOTPLUG_RESIZE:-0} glog="$DIR/hotplug.log" gpid
    bash "$HERE/run-guest.sh" "${GUEST_OPTS[@]}" --quiet --test hotplug --log "$glog" --timeout 600 \
        --append "scsigate.expect_serial=SGCI-HOT scsigate.hotplug_wait=120 scsigate.hotplug_resize=$resize" -- "$@" &
    gpid=$!
    if bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-HOTPLUG-READY 300 >/dev/null; then
        # shellcheck disable=SC2086
        cli lun add "$ctl" $addr --backend file --path "$DIR/hot.img" --size 32M --create --serial SGCI-HOT
        check "$name CLI lun add" $?
        if bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-HOTPLUG-ADDED 150 | sed "s/^/[$name] /"; then
            if [ "$resize" = 1 ] && bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-HOTPLUG-WAIT-RESIZE 60 >/dev/null; then
                # shellcheck disable=SC2086
                cli lun resize "$ctl" $addr --size 64M; check "$name CLI lun resize" $?
                bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-HOTPLUG-RESIZED 150 | sed "s/^/[$name] /"
            fi
            bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-HOTPLUG-WAIT-REMOVE 150 >/dev/null
            # shellcheck disable=SC2086
            cli lun remove "$ctl" $addr; check "$name CLI lun remove" $?
        fi
    fi
    local rc what="added"
    wait $gpid; rc=$?
    [ "$resize" = 1 ] && what="added, resized"
    check "$name guest sees the LUN $what and removed without a rescan" $rc
    grep -a "SCSIGATE-HOTPLUG-REMOVED" "$glog" | tr -d '\r' | sed "s/^/[$name] /"
}

# cycles NAME CONTROLLER ADDRESS-ARGS: 100 add/remove cycles; fds and RSS of the gateway before/after.
cycles() {
    local name=$1 ctl=$2 addr=$3 i bad=0 fd0 fd1 rss0 rss1
    # shellcheck disable=SC2086
    for i in 1 2 3; do cli lun add "$ctl" $addr --backend null --size 32M >/dev/null && cli lun remove "$ctl" $addr >/dev/null; done
    fd0=$(ls "/proc/$GW_PID/fd" | wc -l); rss0=$(awk '/VmRSS/ {print $2}' "/proc/$GW_PID/status")
    for i in $(seq 1 100); do
        # shellcheck disable=SC2086
        cli lun add "$ctl" $addr --backend file --path "$DIR/cycle.img" --size 32M --create >/dev/null || { bad=$((bad + 1)); continue; }
        # shellcheck disable=SC2086
        cli lun remove "$ctl" $addr >/dev/null || bad=$((bad + 1))
    done
    sleep 1
    fd1=$(ls "/proc/$GW_PID/fd" | wc -l); rss1=$(awk '/VmRSS/ {print $2}' "/proc/$GW_PID/status")
    echo "[$name] 100 add/remove cycles: $bad failed calls; fds $fd0 -> $fd1; RSS $rss0 -> $rss1 KiB"
    [ "$bad" = 0 ] && [ "$fd1" -le "$fd0" ] && [ "$rss1" -le $((rss0 + 4096)) ]
    check "$name 100 add/remove cycles return fds and memory to their start" $?
}

# cycles_with_guest NAME CONTROLLER ADDRESS-ARGS QEMU-ARGS...: the 100 cycles while a guest runs fio verify
# on LUN 0 (which must pass: nothing acknowledged on the remaining LUNs is lost).
cycles_with_guest() {
    local name=$1 ctl=$2 addr=$3; shift 3
    local glog="$DIR/cycles.log" gpid
    bash "$HERE/run-guest.sh" "${GUEST_OPTS[@]}" --quiet --test fio-verify --log "$glog" --timeout 900 \
        --append "scsigate.vendor=SCSIGATE scsigate.disk=sda scsigate.bs=4k scsigate.size=48M" -- "$@" &
    gpid=$!
    bash "$HERE/wait-marker.sh" "$glog" "\\[fio-verify\\] disk" 300 >/dev/null
    cycles "$name" "$ctl" "$addr"
    wait $gpid; check "$name guest fio verify on LUN 0 during the cycles" $?
}

suite_vhost_user_scsi() {
    DIR="$WORK/vscsi"; mkdir -p "$DIR"
    one_controller vscsi0 vhost-user-scsi $'queues = 2\nio_threads = 2' "lun = 0
$(file_lun lun0.img 256M 'serial = "SGCI-VS0"')"
    serve vhost-user-scsi || return
    guest_run --quiet --test multi --log "$DIR/guest.log" --timeout 900 \
        --append "scsigate.tests=$SCSI_TESTS scsigate.vendor=SCSIGATE scsigate.expect_serial=SGCI-VS0 scsigate.expect_size=268435456" \
        -- -chardev "socket,id=c0,path=$DIR/vscsi0.sock" -device vhost-user-scsi-pci,chardev=c0,num_queues=2
    check "vhost-user-scsi guest smoke+conformance+fio-verify+pattern" $?
    conformance_check vhost-user-scsi "$DIR/guest.log"
    report_iops vhost-user-scsi "$DIR/guest.log"
    bash "$HERE/check-pattern.sh" "$DIR/guest.log" "$DIR/lun0.img"; check "vhost-user-scsi bytes identical in the backing file" $?
    GUEST_OPTS=()
    HOTPLUG_RESIZE=1 hotplug_run vhost-user-scsi vscsi0 "--lun 1" \
        -chardev "socket,id=c0,path=$DIR/vscsi0.sock" -device vhost-user-scsi-pci,chardev=c0,num_queues=2
    cycles_with_guest vhost-user-scsi vscsi0 "--lun 2" \
        -chardev "socket,id=c0,path=$DIR/vscsi0.sock" -device vhost-user-scsi-pci,chardev=c0,num_queues=2
    stop_gateway; check "vhost-user-scsi gateway drains and exits 0 on SIGTERM" $?
}

# holes_at FILE LOG MARKER: every "MARKER off=N len=M" region of the guest log is a hole in FILE
holes_at() {
    python3 - "$1" "$2" "$3" <<'PY'
import os, re, sys
path, log, marker = sys.argv[1:4]
regions = []
for line in open(log, errors="replace"):
    if line.startswith(marker):
        kv = dict(re.findall(r"(\w+)=(\S+)", line))
        if "offset" in kv and "bytes" in kv:
            regions.append((int(kv["offset"]), int(kv["bytes"])))
if not regions:
    print(f"{marker}: no region in the guest log"); sys.exit(1)
fd = os.open(path, os.O_RDONLY)
bad = 0
for off, length in regions:
    try:
        data = os.lseek(fd, off, os.SEEK_DATA)
    except OSError:
        data = os.fstat(fd).st_size
    if data < off + length:
        print(f"{marker}: data at {data} inside [{off}, {off + length})"); bad += 1
    else:
        print(f"{marker}: [{off}, {off + length}) is a hole in {path}")
sys.exit(1 if bad else 0)
PY
}

suite_vhost_user_blk() {
    DIR="$WORK/vblk"; mkdir -p "$DIR"
    one_controller vblk0 vhost-user-blk '' "$(file_lun blk0.img 256M 'serial = "SGCI-VB0"')"
    serve vhost-user-blk || return
    guest_run --quiet --test multi --log "$DIR/guest.log" --timeout 900 \
        --append "scsigate.tests=smoke,fio-verify,discard,pattern scsigate.expect_serial=SGCI-VB0" \
        -- -chardev "socket,id=c0,path=$DIR/vblk0.sock" -device vhost-user-blk-pci,chardev=c0
    check "vhost-user-blk guest smoke+fio-verify+discard+pattern" $?
    bash "$HERE/check-pattern.sh" "$DIR/guest.log" "$DIR/blk0.img"; check "vhost-user-blk bytes identical in the backing file" $?
    holes_at "$DIR/blk0.img" "$DIR/guest.log" SCSIGATE-DISCARD; check "vhost-user-blk discard punched holes in the file" $?
    holes_at "$DIR/blk0.img" "$DIR/guest.log" SCSIGATE-WRITE-ZEROES; check "vhost-user-blk write-zeroes left holes in the file" $?
    # Its one LUN removed while the gateway runs: the front-end closes its channel (the file unlocks at once).
    cli lun remove vblk0 --lun 0 >/dev/null; check "vhost-user-blk CLI lun remove" $?
    flock -n -x "$DIR/blk0.img" true; check "vhost-user-blk removed LUN's file unlocked" $?
    ! grep -q "still open" "$DIR/gw.log"; check "vhost-user-blk no channel of the removed LUN left open" $?
    stop_gateway; check "vhost-user-blk gateway drains and exits 0 on SIGTERM" $?
}

suite_iscsi() {
    DIR="$WORK/iscsi"; mkdir -p "$DIR"
    local out url
    out=$(bash "$HERE/tgt/tgtd.sh" serve "$DIR/tgt" 3262 17 iqn.2026-11.org.scsigate:ci "$DIR/tgt-lun1.img" 256M)
    check "tgtd start" $? || return
    url=$(printf '%s\n' "$out" | sed -n 's/^TGT_URL=//p')
    { gateway_header "$DIR"; cat <<TOML

[[controller]]
name = "iscsi0"
transport = "vhost-user-scsi"
socket = "$DIR/iscsi0.sock"

[[controller.lun]]
lun = 0
backend = "iscsi"
url = "$url"
serial = "SGCI-IS0"
TOML
    } > "$DIR/gw.toml"
    if start_gateway "$DIR/gw.toml" "$DIR/gw.log"; then
        check "iscsi gateway start" 0
        guest_run --quiet --test multi --log "$DIR/guest.log" --timeout 900 \
            --append "scsigate.tests=$SCSI_TESTS scsigate.vendor=SCSIGATE scsigate.expect_serial=SGCI-IS0" \
            -- -chardev "socket,id=c0,path=$DIR/iscsi0.sock" -device vhost-user-scsi-pci,chardev=c0
        check "iscsi-backed guest smoke+conformance+fio-verify+pattern" $?
        grep -a "remote persistent reservations" "$DIR/gw.log" | head -1 | cut -c1-260 | sed 's/^/[iscsi] /'
        conformance_check iscsi "$DIR/guest.log"
        report_iops iscsi "$DIR/guest.log"
        bash "$HERE/check-pattern.sh" "$DIR/guest.log" "$DIR/tgt-lun1.img"; check "iscsi bytes identical in tgtd's backing file" $?
        stop_gateway; check "iscsi gateway drains and exits 0 on SIGTERM" $?
        # tgtd killed (SIGKILL) and restarted during a guest fio randwrite+verify of at least 60 s
        # (repeated write+verify rounds): no error may reach fio.
        start_gateway "$DIR/gw.toml" "$DIR/gw2.log"; check "iscsi gateway restart" $? || return
        bash "$HERE/run-guest.sh" --quiet --test fio-verify --log "$DIR/outage.log" --timeout 900 \
            --append "scsigate.vendor=SCSIGATE scsigate.bs=4k scsigate.size=128M scsigate.runtime=60" \
            -- -chardev "socket,id=c0,path=$DIR/iscsi0.sock" -device vhost-user-scsi-pci,chardev=c0 &
        local guest=$! t0
        if bash "$HERE/wait-marker.sh" "$DIR/outage.log" "\\[fio-verify\\] disk" 300 >/dev/null; then
            sleep 15
            t0=$(date +%s)
            kill -KILL "$(cat "$DIR/tgt/tgtd.pid")"
            sleep 5
            bash "$HERE/tgt/tgtd.sh" serve "$DIR/tgt" 3262 17 iqn.2026-11.org.scsigate:ci "$DIR/tgt-lun1.img" 256M >/dev/null
            echo "[iscsi] tgtd killed and restarted: outage $(( $(date +%s) - t0 )) s during guest fio verify"
        fi
        wait $guest; check "iscsi fio verify across a tgtd kill/restart (0 errors)" $?
        grep -a "fio 4k:\|fio-verify:" "$DIR/outage.log" | tr -d '\r' | sed 's/^/[iscsi] /'
        local ran
        ran=$(grep -a "fio-verify: .* passed" "$DIR/outage.log" | tr -d '\r' | sed -n 's/.*rounds, \([0-9]*\) s).*/\1/p' | tail -1)
        [ "${ran:-0}" -ge 60 ]; check "iscsi outage fio run lasted >= 60 s (${ran:-?} s)" $?
        grep -a -i "lost\|reconnect\|logged in\|resubmit\|back after" "$DIR/gw2.log" | tail -6 | cut -c1-220 | sed 's/^/[iscsi] /'
        grep -a -q "resubmitting [0-9]* commands" "$DIR/gw2.log"; check "iscsi gateway log shows the reconnect and the resubmitted count" $?
        stop_gateway; check "iscsi gateway drains and exits 0 on SIGTERM after the outage" $?
    else
        check "iscsi gateway start" 1
    fi
    bash "$HERE/tgt/tgtd.sh" stop "$DIR/tgt" >/dev/null 2>&1
}

# vhost-user-blk-resize: QEMU 11 (sid chroot; it speaks VHOST_USER_PROTOCOL_F_CONFIG, QEMU 7.2 does not)
# attaches a vhost-user-blk controller; the LUN is resized from the CLI while the guest runs, and
# the guest's virtio_blk must see the new size from the config-change interrupt alone (no I/O, no rescan).
suite_vhost_user_blk_resize() {
    DIR="$WORK/vblkr"; mkdir -p "$DIR"
    one_controller vblkr0 vhost-user-blk '' "$(file_lun blkr0.img 64M)"
    serve vhost-user-blk-resize || return
    local glog="$DIR/guest.log" gpid rc
    bash "$HERE/run-guest.sh" --sid --quiet --test resize --log "$glog" --timeout 600 \
        --append "scsigate.resize_wait=120 scsigate.expect_size=100663296" \
        -- -chardev "socket,id=c0,path=$DIR/vblkr0.sock" -device vhost-user-blk-pci,chardev=c0 &
    gpid=$!
    if bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-RESIZE-WAIT 300 | sed "s/^/[vhost-user-blk-resize] /"; then
        cli lun resize vblkr0 --size 96M; check "vhost-user-blk-resize CLI lun resize 64M -> 96M" $?
    fi
    wait $gpid; rc=$?
    grep -a "SCSIGATE-RESIZED" "$glog" | tr -d '\r' | sed "s/^/[vhost-user-blk-resize] /"
    check "vhost-user-blk-resize guest (QEMU 11) sees the new size from the config-change interrupt" $rc
    stop_gateway; check "vhost-user-blk-resize gateway drains and exits 0 on SIGTERM" $?
}

# vhost-user-memhotplug: guest RAM grows while a vhost-user-scsi disk is in use (QEMU 7.2 pc-dimm hotplug,
# memfd share=on: the gateway gets VHOST_USER_ADD_MEM_REG for the live rings); fio verify then runs with
# its buffers in the new memory (the guest onlines it as ZONE_MOVABLE, which user pages come from first).
suite_vhost_user_memhotplug() {
    DIR="$WORK/vmemhp"; mkdir -p "$DIR"
    one_controller vmemhp0 vhost-user-scsi '' "lun = 0
$(file_lun lun0.img 128M)"
    serve vhost-user-memhotplug || return
    local glog="$DIR/guest.log" gpid rc port=$((20000 + RANDOM % 20000))
    bash "$HERE/run-guest.sh" --quiet --test memhotplug --log "$glog" --timeout 900 \
        --append "memhp_default_state=online_movable scsigate.memhp_wait=120 scsigate.size=32M" \
        -- -m 1024M,slots=2,maxmem=2048M -monitor "tcp:127.0.0.1:$port,server,nowait" \
        -chardev "socket,id=c0,path=$DIR/vmemhp0.sock" -device vhost-user-scsi-pci,chardev=c0 &
    gpid=$!
    if bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-MEMHP-READY 300 | sed "s/^/[vhost-user-memhotplug] /"; then
        bash "$HERE/qemu-hmp.sh" "$port" "object_add memory-backend-memfd,id=hp1,size=512M,share=on"
        bash "$HERE/qemu-hmp.sh" "$port" "device_add pc-dimm,id=dimm1,memdev=hp1"
        if bash "$HERE/wait-marker.sh" "$glog" SCSIGATE-MEMHP-WAIT-REMOVE 300 >/dev/null; then
            bash "$HERE/qemu-hmp.sh" "$port" "device_del dimm1"
        fi
    fi
    wait $gpid; rc=$?
    grep -a "SCSIGATE-MEMHP-ADDED\|SCSIGATE-MEMHP-ZONE\|SCSIGATE-MEMHP-REMOVED\|fio 4k\|fio 64k" "$glog" | tr -d '\r' | sed "s/^/[vhost-user-memhotplug] /"
    check "vhost-user-memhotplug guest fio verify after a 512M DIMM hotplug and after its unplug" $rc
    grep -q "memory region added" "$DIR/gw.log"; check "vhost-user-memhotplug gateway mapped the new region (ADD_MEM_REG)" $?
    grep -q "memory region removed" "$DIR/gw.log"; check "vhost-user-memhotplug gateway unmapped it (REM_MEM_REG)" $?
    grep -a "memory region added\\|memory region removed" "$DIR/gw.log" | sed "s/^/[vhost-user-memhotplug] /" | tail -3
    stop_gateway; check "vhost-user-memhotplug gateway drains and exits 0 on SIGTERM" $?
}

# kill_and_restart NAME GUEST-PID KILLS SECONDS LOG-PREFIX [HOOK]: while the guest runs, KILLS times: wait SECONDS,
# SIGKILL the gateway, start it again on DIR/gw.toml 1 s later (log LOG-PREFIX<K>.log). HOOK K STAGE runs around kill K
# (STAGE: before-kill, after-kill, after-restart). Sets RESTARTED to the number of restarts.
kill_and_restart() {
    local name=$1 gpid=$2 kills=$3 seconds=$4 prefix=$5 hook=${6:-} k pid
    RESTARTED=0
    for k in $(seq 1 "$kills"); do
        sleep "$seconds"
        kill -0 "$gpid" 2>/dev/null || break
        [ -z "$hook" ] || "$hook" "$k" before-kill
        pid=$GW_PID; GW_PID=""
        kill -KILL "$pid"; wait "$pid" 2>/dev/null
        echo "[$name] gateway killed (SIGKILL) during fio (#$k); restarting in 1 s"
        [ -z "$hook" ] || "$hook" "$k" after-kill
        sleep 1
        start_gateway "$DIR/gw.toml" "$prefix$k.log" || break
        RESTARTED=$k
        [ -z "$hook" ] || "$hook" "$k" after-restart
    done
}

# vhost-user-blk-reconnect: the gateway is killed (SIGKILL) in the middle of a guest fio verify and
# started again; QEMU (chardev reconnect=1) reconnects and hands over the in-flight region
# (VHOST_USER_SET_INFLIGHT_FD); what the guest still waited for is resubmitted, fio ends with 0 errors.
suite_vhost_user_blk_reconnect() {
    DIR="$WORK/vblkrc"; mkdir -p "$DIR"
    one_controller vblkrc0 vhost-user-blk '' "$(file_lun blk0.img 512M)"
    serve vhost-user-blk-reconnect || return
    local glog="$DIR/guest.log" gpid rc
    bash "$HERE/run-guest.sh" --quiet --test fio-verify --log "$glog" --timeout 900 \
        --append "scsigate.size=256M scsigate.bs=4k" \
        -- -chardev "socket,id=c0,path=$DIR/vblkrc0.sock,reconnect=1" -device vhost-user-blk-pci,chardev=c0 &
    gpid=$!
    if bash "$HERE/wait-marker.sh" "$glog" '\[fio-verify\] disk' 300 >/dev/null; then
        # Three kills a few seconds apart: whatever was popped and not yet completed at each is resubmitted
        # by the next gateway from the in-flight region (the count is printed; fio must see no error).
        kill_and_restart vhost-user-blk-reconnect "$gpid" 3 3 "$DIR/gw"
        [ "$RESTARTED" -ge 1 ]; check "vhost-user-blk-reconnect gateway restarted after each kill ($RESTARTED)" $?
    fi
    wait $gpid; rc=$?
    grep -a "fio 4k" "$glog" | tr -d '\r' | sed "s/^/[vhost-user-blk-reconnect] /"
    check "vhost-user-blk-reconnect guest fio verify across gateway kills and restarts" $rc
    grep -a "in-flight region adopted\|resubmitting" "$DIR"/gw[123].log 2>/dev/null | cut -c1-220 | sed "s/^/[vhost-user-blk-reconnect] /"
    stop_gateway; check "vhost-user-blk-reconnect gateway drains and exits 0 on SIGTERM" $?
}

# More suites live one per file in suites/: each defines suite_NAME and adds NAME to REGISTERED_SUITES
# (run after the built-in ones, in file-name order).
REGISTERED_SUITES=()
for f in "$HERE"/suites/*.sh; do
    [ -e "$f" ] || continue
    . "$f"
done
SUITES=("$@")
[ ${#SUITES[@]} -gt 0 ] || SUITES=(vhost-user-scsi vhost-user-blk vhost-user-blk-resize vhost-user-blk-reconnect vhost-user-memhotplug pvscsi iscsi "${REGISTERED_SUITES[@]}")
for s in "${SUITES[@]}"; do
    sg_log "suite $s"
    "suite_${s//-/_}"
done
[ ${#failed_checks[@]} -eq 0 ] || printf 'real-client: failed: %s\n' "${failed_checks[@]}"
echo "real-client: guest runs retried after a guest kernel panic at boot: $RETRIES"
echo "real-client: $pass passed, $fail failed"
[ "$fail" = 0 ]
