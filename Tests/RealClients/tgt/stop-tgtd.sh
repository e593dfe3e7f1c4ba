#!/usr/bin/env bash
# Stop a tgtd started by start-tgtd.sh (by its pid file; never by name).
# Usage: stop-tgtd.sh [--state-dir DIR] [--control-port N]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../lib.sh"
state=/run/scsigate-tgt cport=
while [ $# -gt 0 ]; do
    case $1 in
        --state-dir) state=$2; shift ;;
        --control-port) cport=$2; shift ;;
        -h|--help) sed -n '2,3p' "$0"; exit 0 ;;
        *) sg_die "unknown argument: $1" ;;
    esac
    shift
done
[ -f "$state/tgtd.pid" ] || { sg_log "no tgtd pid file in $state"; exit 0; }
pid=$(cat "$state/tgtd.pid")
[ -n "$cport" ] || cport=$(cat "$state/control-port" 2>/dev/null || echo 7)
if kill -0 "$pid" 2>/dev/null && grep -q tgtd "/proc/$pid/comm" 2>/dev/null; then
    tgtadm -C "$cport" --op update --mode sys --name State -v offline >/dev/null 2>&1 || true
    tgtadm -C "$cport" --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    sg_log "stopped tgtd pid $pid"
fi
rm -f "$state/tgtd.pid"
