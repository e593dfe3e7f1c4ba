#!/usr/bin/env bash
# Boot the test guest under QEMU (TCG) and run one guest test script.
#
# Usage: run-guest.sh --test NAME [options] [-- QEMU_ARGS...]
#   --test NAME       guest script Tests/RealClients/tests/NAME.sh (smoke, conformance, fio-verify, ...)
#   --append ARGS     extra kernel command line, e.g. "scsigate.vendor=SCSIGATE scsigate.size=32M"
#                     (repeatable; values must not contain spaces)
#   --log FILE        console log (default /tmp/scsigate-guest-NAME-<time>.log)
#   --timeout SECS    kill QEMU after SECS (default 600)
#   --memory MiB      guest RAM in MiB, memfd share=on (default 1024)
#   --plain-memory    guest RAM without an fd (plain -m, no memory backend): a vfio-user device then
#                     reaches it through DMA_READ/DMA_WRITE messages (vhost-user cannot work this way)
#   --smp N           vCPUs (default 1)
#   --machine TYPE    QEMU machine (default pc). microvm[,OPTIONS] (e.g. microvm,acpi=on): no PCI, virtio-mmio
#                     devices (-device vhost-user-blk / vhost-user-scsi), console on its ISA serial port; the
#                     guest RAM is the machine's memory-backend (no NUMA); TSC/delay-loop figures on the command line
#   --sid             run QEMU from the sid chroot (QEMU >= 10.1, vfio-user-pci); the kernel,
#                     initramfs, /tmp, /var/tmp and every --bind DIR are visible inside
#   --bind DIR        (with --sid) extra host path to show in the chroot, e.g. a socket dir
#   --qemu BIN        QEMU binary (default qemu-system-x86_64; installs qemu-system-x86 if absent)
#   --quiet           do not copy the console to stdout (the log still gets it)
#   -- QEMU_ARGS      passed through, e.g.
#        -chardev socket,id=c0,path=SOCK -device vhost-user-scsi-pci,chardev=c0
#        -device '{"driver":"vfio-user-pci","socket":{"path":"SOCK","type":"unix"}}'
#        -drive file=x.img,if=none,id=d0,format=raw -device virtio-scsi-pci -device scsi-hd,drive=d0
# Exit code: the guest test's exit code (from "SCSIGATE-GUEST-EXIT rc=N"), 124 on timeout,
# 125 when QEMU ended without the marker. Last stdout line:
#   SCSIGATE-GUEST test=NAME rc=N wall=S boot=S log=FILE
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../../Deploy/lib.sh"

test= log= timeout=600 mem=1024 smp=1 machine=pc sid=0 qemu=qemu-system-x86_64 quiet=0 plainmem=0
append=() binds=() qargs=()
while [ $# -gt 0 ]; do
    case $1 in
        --test) test=$2; shift ;;
        --append) append+=("$2"); shift ;;
        --log) log=$2; shift ;;
        --timeout) timeout=$2; shift ;;
        --memory) mem=$2; shift ;;
        --plain-memory) plainmem=1 ;;
        --smp) smp=$2; shift ;;
        --machine) machine=$2; shift ;;
        --sid) sid=1 ;;
        --bind) binds+=("$2"); shift ;;
        --qemu) qemu=$2; shift ;;
        --quiet) quiet=1 ;;
        --) shift; qargs=("$@"); break ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) sg_die "unknown argument: $1 (QEMU arguments go after --)" ;;
    esac
    shift
done
[ -n "$test" ] || sg_die "--test NAME is required (one of: $(cd "$HERE/tests" && ls *.sh | sed 's/\.sh$//' | tr '\n' ' '))"
[ -f "$HERE/tests/$test.sh" ] || sg_die "no guest test $HERE/tests/$test.sh"
case $timeout in ''|*[!0-9]*) sg_die "--timeout must be seconds: $timeout" ;; esac
case $mem in ''|*[!0-9]*) sg_die "--memory must be MiB: $mem" ;; esac
case $smp in ''|*[!0-9]*) sg_die "--smp must be a number: $smp" ;; esac
sg_require_root

info=$("$HERE/build-initramfs.sh") || sg_die "build-initramfs.sh failed"
eval "$info"   # KVER VMLINUZ MODULES INITRD
[ -n "$log" ] || log="/tmp/scsigate-guest-$test-$(date -u +%Y%m%dT%H%M%S)-$$.log"
mkdir -p "$(dirname "$log")"
: > "$log"

cmdline=$(sg_guest_cmdline "$test" "${append[@]}")
memargs=(-object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa node,memdev=mem)
[ $plainmem = 1 ] && memargs=()
case $machine in
    microvm*)
        [ $plainmem = 1 ] || { machine="$machine,memory-backend=mem"; memargs=("${memargs[@]:0:2}"); }
        # under TCG a microvm has no PIT/HPET reference to calibrate the TSC and the delay loop against: the
        # kernel stops at "tsc: Marking TSC unstable due to could not calculate TSC khz" without these figures
        cmdline="$cmdline tsc_early_khz=2000000 lpj=4000000 no_timer_check" ;;
esac
cmd=("$qemu" -accel tcg -cpu max -machine "$machine" -m "${mem}M" -smp "$smp"
     "${memargs[@]}"
     -nographic -no-reboot -nic none
     -kernel "$VMLINUZ" -initrd "$INITRD" -append "$cmdline"
     "${qargs[@]}")
if [ $sid = 1 ]; then
    sidargs=(--ro-bind "$(dirname "$VMLINUZ")" --ro-bind "$(dirname "$INITRD")")
    for b in "${binds[@]}"; do sidargs+=(--bind "$b"); done
    # build/verify the chroot now, outside the timeout
    "$HERE/chroot/make-sid-chroot.sh" >/dev/null || sg_die "make-sid-chroot.sh failed"
    cmd=("$HERE/chroot/sid-run.sh" --no-build "${sidargs[@]}" -- "${cmd[@]}")
else
    if [ "$qemu" = qemu-system-x86_64 ] && ! command -v qemu-system-x86_64 >/dev/null; then
        sg_apt_install qemu-system-x86
    fi
fi

{ printf 'scsigate run-guest: %s\n' "$(date -u +%FT%TZ)"; printf ' %q' "${cmd[@]}"; echo; } >> "$log"
sg_log "test=$test log=$log timeout=${timeout}s"
t0=$(date +%s.%N)
if [ $quiet = 1 ]; then
    timeout -k 10 "$timeout" "${cmd[@]}" </dev/null >> "$log" 2>&1 &
else
    timeout -k 10 "$timeout" "${cmd[@]}" </dev/null > >(tee -a "$log") 2>&1 &
fi
qpid=$!
# timeout(1) runs in its own process group: forward our termination to it
trap 'kill -TERM $qpid 2>/dev/null; wait $qpid 2>/dev/null; exit 130' INT TERM HUP
wait $qpid
qrc=$?
trap - INT TERM HUP
sleep 0.2   # let tee flush
t1=$(date +%s.%N)
wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b - a}')
marker=$(tr -d '\r' < "$log" | sed -n 's/^SCSIGATE-GUEST-EXIT rc=\([0-9]*\).*/\1/p' | tail -1)
boot=$(tr -d '\r' < "$log" | sed -n 's/^scsigate-guest: running .*modules loaded at \([0-9.]*\)s.*/\1/p' | tail -1)
if [ -n "$marker" ]; then
    rc=$marker
elif [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    sg_log "timeout after ${timeout}s without the end marker"
    rc=124
else
    sg_log "QEMU exited (rc=$qrc) without the end marker; see $log"
    rc=125
fi
echo "SCSIGATE-GUEST test=$test rc=$rc wall=${wall}s boot=${boot:-?}s log=$log"
exit "$rc"
