#!/usr/bin/env bash
# Per-LUN QoS from a real guest (not a timed test): one virtio-scsi controller (QEMU 7.2, TCG) with two
# null LUNs, LUN 1 limited by iops_limit (default 2000), LUN 0 unlimited; the guest (tests/qos-fio.sh)
# runs fio 4 KiB random reads on the unlimited disk alone, then on both at once, and the host prints
# the figures with the limited LUN's error against its limit and its throttled time from `scsigate stats`.
# Under TCG a guest may not offer 10x the limit: the script prints the offered load it measured (the
# free disk alone) so that can be judged; Benchmarks/qos-bench.sh loads the limit at >= 10x in-process.
# Usage: qos-guest.sh [--limit IOPS] [--runtime S]
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/Deploy/lib.sh"
sg_require_root
limit=2000 runtime=20
while [ $# -gt 0 ]; do
    case $1 in
        --limit) limit=$2; shift ;;
        --runtime) runtime=$2; shift ;;
        *) sg_die "unknown argument: $1" ;;
    esac
    shift
done
cd "$ROOT"
swift build --product scsigate >&2 || sg_die "swift build failed"
BIN="$(swift build --show-bin-path)/scsigate"
DIR=$(sg_tempdir qos)
cat > "$DIR/gw.toml" <<TOML
[gateway]
state_dir = "$DIR/state"
control_socket = "$DIR/control.sock"

[[controller]]
name = "qos0"
transport = "vhost-user-scsi"
socket = "$DIR/qos0.sock"

[[controller.lun]]
lun = 0
backend = "null"
size = "1GiB"
serial = "SGQOS-FREE"

[[controller.lun]]
lun = 1
backend = "null"
size = "1GiB"
serial = "SGQOS-LIMITED"
iops_limit = $limit
TOML
"$BIN" serve --config "$DIR/gw.toml" > "$DIR/gw.log" 2>&1 &
gw=$!
trap 'kill $gw 2>/dev/null; wait $gw 2>/dev/null; rm -rf "$DIR"' EXIT
sg_wait 20 grep -q "running; stop with SIGTERM" "$DIR/gw.log"
bash "$ROOT/Tests/RealClients/run-guest.sh" --quiet --test qos-fio --log "$DIR/guest.log" --timeout 600 \
    --append "scsigate.runtime=$runtime" \
    -- -chardev "socket,id=c0,path=$DIR/qos0.sock" -device vhost-user-scsi-pci,chardev=c0 || sg_die "guest failed: $(tail -20 "$DIR/guest.log")"
alone=$(tr -d '\r' < "$DIR/guest.log" | sed -n 's/^SCSIGATE-QOS phase=alone free=\([0-9]*\).*/\1/p')
read -r limited free < <(tr -d '\r' < "$DIR/guest.log" | sed -n 's/^SCSIGATE-QOS phase=both limited=\([0-9]*\) free=\([0-9]*\).*/\1 \2/p')
throttled=$("$BIN" stats --json --socket "$DIR/control.sock" | python3 -c 'import json,sys; l=[x for x in json.load(sys.stdin)["luns"] if x["lun"]==1][0]; print(l["throttled"], "requests,", round(l["throttled_ns"]/1e9, 1), "s")')
echo "qos-guest: free disk alone: $alone IOPS (offered load: $(python3 -c "print(round($alone/$limit, 1))")x the limit)"
echo "qos-guest: both: limited $limited IOPS (limit $limit, $(python3 -c "print(f'{($limited-$limit)/$limit*100:+.1f}')") %), free $free IOPS ($(python3 -c "print(round($free/$alone*100, 1))") % of alone)"
echo "qos-guest: limited LUN throttled: $throttled"
