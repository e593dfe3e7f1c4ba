#!/usr/bin/env bash
# Start Debian's tgtd (stgt) as a local iSCSI target with one file-backed LUN,
# for ScsiGate's iSCSI back-end tests and as a conformance reference.
#
# Usage: start-tgtd.sh [options]
#   --portal IP        listen address (default 127.0.0.1)
#   --port N           iSCSI port (default 3260)
#   --control-port N   tgtd management port, so a system tgtd on 0 is untouched (default 7)
#   --iqn IQN          target name (default iqn.2026-11.org.scsigate:tgt-test)
#   --backing FILE     LUN 1 backing file (default /var/tmp/scsigate-tgt/lun1.img)
#   --size SIZE        create/extend the backing file to SIZE (truncate syntax, default 256M)
#   --bsoflags FLAGS   tgt backing-store flags: sync, direct (default none)
#   --chap-user U --chap-password P   require CHAP (password 12-16 chars for most initiators)
#   --state-dir DIR    pid file, log (default /run/scsigate-tgt)
# Restarts a tgtd previously started by this script with the same state dir.
# Prints on stdout: TGT_URL=iscsi://[U%P@]IP:PORT/IQN/1  TGT_PID=N  TGT_BACKING=FILE
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../lib.sh"

portal=127.0.0.1 port=3260 cport=7 iqn=iqn.2026-11.org.scsigate:tgt-test
backing= size=256M bsoflags= chap_user= chap_pass= state=/run/scsigate-tgt
while [ $# -gt 0 ]; do
    case $1 in
        --portal) portal=$2; shift ;;
        --port) port=$2; shift ;;
        --control-port) cport=$2; shift ;;
        --iqn) iqn=$2; shift ;;
        --backing) backing=$2; shift ;;
        --size) size=$2; shift ;;
        --bsoflags) bsoflags=$2; shift ;;
        --chap-user) chap_user=$2; shift ;;
        --chap-password) chap_pass=$2; shift ;;
        --state-dir) state=$2; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) sg_die "unknown argument: $1" ;;
    esac
    shift
done
[ -n "$chap_user" ] && [ -z "$chap_pass" ] && sg_die "--chap-user needs --chap-password"
[ -z "$chap_user" ] && [ -n "$chap_pass" ] && sg_die "--chap-password needs --chap-user"
case $port in ''|*[!0-9]*) sg_die "--port must be a number: $port" ;; esac
case $cport in ''|*[!0-9]*) sg_die "--control-port must be a number: $cport" ;; esac

sg_require_root
sg_apt_install tgt
mkdir -p "$state"
[ -n "$backing" ] || backing=/var/tmp/scsigate-tgt/lun1.img

"$HERE/stop-tgtd.sh" --state-dir "$state" --control-port "$cport" >/dev/null 2>&1 || true

mkdir -p "$(dirname "$backing")"
[ -e "$backing" ] || truncate -s "$size" "$backing"
if [ -f "$backing" ] && [ "$(stat -c %s "$backing")" -lt "$(numfmt --from=iec "${size%B}" 2>/dev/null || echo 0)" ]; then
    truncate -s "$size" "$backing"
fi

tgt() { tgtadm -C "$cport" --lld iscsi "$@"; }

setsid tgtd -f -C "$cport" --iscsi "portal=$portal:$port" >"$state/tgtd.log" 2>&1 </dev/null &
pid=$!
echo "$pid" > "$state/tgtd.pid"
echo "$cport" > "$state/control-port"
ok=0
for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || { cat "$state/tgtd.log" >&2; sg_die "tgtd exited at start (port $port busy?)"; }
    if tgt --mode sys --op show >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.1
done
[ $ok = 1 ] || { kill "$pid" 2>/dev/null; sg_die "tgtd management port $cport did not answer"; }

tgt --op new --mode target --tid 1 -T "$iqn"
if [ -n "$bsoflags" ]; then
    tgt --op new --mode logicalunit --tid 1 --lun 1 -b "$backing" --bsoflags "$bsoflags"
else
    tgt --op new --mode logicalunit --tid 1 --lun 1 -b "$backing"
fi
tgt --op bind --mode target --tid 1 -I ALL
auth=
if [ -n "$chap_user" ]; then
    tgt --op new --mode account --user "$chap_user" --password "$chap_pass"
    tgt --op bind --mode account --tid 1 --user "$chap_user"
    auth="$chap_user%$chap_pass@"
fi
# wait for the portal to accept connections
for _ in $(seq 1 50); do
    (exec 3<>"/dev/tcp/$portal/$port") 2>/dev/null && break
    sleep 0.1
done
host=$portal; case $portal in *:*) host="[$portal]" ;; esac
sg_log "tgtd pid $pid serving $iqn LUN 1 = $backing on $portal:$port"
echo "TGT_URL=iscsi://$auth$host:$port/$iqn/1"
echo "TGT_PID=$pid"
echo "TGT_BACKING=$backing"
