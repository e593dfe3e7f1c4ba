#!/usr/bin/env bash
# Per-LUN QoS benchmark (not a timed test): builds and runs Benchmarks/QoSBench, an in-process driver of
# PolicyChannel (the channel the virtio-scsi, virtio-blk and PVSCSI front-ends all submit through) over
# two null LUNs: one with iops_limit (default 2000) loaded by several threads at >= 10x its limit, one
# without a limit beside it. Prints each phase's IOPS and PASS when the limited LUN holds within 10 % of
# its limit while the unlimited one keeps >= 90 % of its speed alone.
# Usage: qos-bench.sh [--release] [--limit IOPS] [--threads N] [--depth D] [--seconds S]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
config=debug
if [ "${1:-}" = --release ]; then config=release; shift; fi
swift build -c "$config" --product qos-bench >&2
exec "$(swift build -c "$config" --show-bin-path)/qos-bench" "$@"
