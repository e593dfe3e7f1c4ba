#!/bin/sh
# Starts, configures and stops a private tgtd instance for the ISCSIBackend tests.
#
#   backend-test-target.sh start  <dir> <port> <control-port>
#       Installs Debian's tgt if tgtd is missing, starts `tgtd -f` on 127.0.0.1:<port> with its own
#       control port (so it never touches another tgtd), writes <dir>/tgtd.pid and <dir>/tgtd.log,
#       and waits until tgtadm answers.
#   backend-test-target.sh target <control-port> <tid> <iqn> <backing-file> [<chap-user> <chap-secret>]
#       Creates target <tid> named <iqn> with LUN 1 on <backing-file> (thin provisioning on, so
#       UNMAP and WRITE SAME with UNMAP reach the file), bound to ALL initiators; with CHAP when a
#       user and secret are given.
#   backend-test-target.sh addlun <control-port> <tid> <lun> <backing-file>
#       Adds a LUN to a running target.
#   backend-test-target.sh luparam <control-port> <tid> <lun> <name=value>
#       Changes a LUN parameter of a running target (readonly=1, ...).
#   backend-test-target.sh stop   <dir> [TERM]
#       Stops the instance started in <dir> (SIGKILL by default: tgtd ignores SIGTERM while it
#       has targets).
set -eu

cmd=${1:-}
shift || true

case "$cmd" in
start)
    dir=$1 port=$2 cport=$3
    if ! command -v tgtd >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "backend-test-target: installing tgt" >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y tgt >&2 || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y tgt >&2; }
        fi
    fi
    command -v tgtd >/dev/null 2>&1 || { echo "backend-test-target: tgtd not installed and cannot be installed" >&2; exit 3; }
    mkdir -p "$dir" /var/run/tgtd 2>/dev/null || true
    rm -f "/var/run/tgtd/socket.$cport" "/var/run/tgtd/socket.$cport.lock"
    setsid tgtd -f -C "$cport" --iscsi "portal=127.0.0.1:$port" >"$dir/tgtd.log" 2>&1 </dev/null &
    echo $! >"$dir/tgtd.pid"
    i=0
    while [ $i -lt 100 ]; do
        if tgtadm -C "$cport" --lld iscsi --mode sys --op show >/dev/null 2>&1; then
            # tgtadm may answer before the portal listens: wait for the listening socket too.
            hex=$(printf '%04X' "$port")
            j=0
            while [ $j -lt 100 ]; do
                if grep -q ":$hex 00000000:0000 0A" /proc/net/tcp 2>/dev/null; then exit 0; fi
                sleep 0.05
                j=$((j + 1))
            done
            echo "backend-test-target: tgtd answers on control port $cport but does not listen on 127.0.0.1:$port; log:" >&2
            cat "$dir/tgtd.log" >&2
            exit 6
        fi
        if ! kill -0 "$(cat "$dir/tgtd.pid")" 2>/dev/null; then
            echo "backend-test-target: tgtd exited; log:" >&2; cat "$dir/tgtd.log" >&2; exit 4
        fi
        sleep 0.05
        i=$((i + 1))
    done
    echo "backend-test-target: tgtd did not answer on control port $cport" >&2
    exit 5
    ;;
target)
    cport=$1 tid=$2 iqn=$3 file=$4
    t() { tgtadm -C "$cport" --lld iscsi "$@"; }
    t --mode target --op new --tid "$tid" --targetname "$iqn"
    t --mode logicalunit --op new --tid "$tid" --lun 1 --backing-store "$file"
    t --mode logicalunit --op update --tid "$tid" --lun 1 --params thin_provisioning=1
    if [ $# -ge 6 ]; then
        t --mode account --op new --user "$5" --password "$6" 2>/dev/null || true
        t --mode account --op bind --tid "$tid" --user "$5"
    fi
    t --mode target --op bind --tid "$tid" --initiator-address ALL
    ;;
addlun)
    # addlun <control-port> <tid> <lun> <backing-file>: adds a LUN to a running target (tgtd then
    # raises REPORTED LUNS DATA HAS CHANGED on every session: a real UNIT ATTENTION for the tests).
    tgtadm -C "$1" --lld iscsi --mode logicalunit --op new --tid "$2" --lun "$3" --backing-store "$4"
    ;;
luparam)
    # luparam <control-port> <tid> <lun> <name=value>: e.g. readonly=1 (writes then fail with DATA PROTECT).
    tgtadm -C "$1" --lld iscsi --mode logicalunit --op update --tid "$2" --lun "$3" --params "$4"
    ;;
stop)
    dir=$1 sig=${2:-KILL}
    [ -f "$dir/tgtd.pid" ] || exit 0
    pid=$(cat "$dir/tgtd.pid")
    kill -s "$sig" "$pid" 2>/dev/null || true
    i=0
    # Wait until it is gone, or a zombie whose other threads have all exited (only then are its
    # files, the listening socket included, closed; the zombie itself may be reaped late).
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 250 ]; do
        state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$pid/status" 2>/dev/null || true)
        threads=$(ls "/proc/$pid/task" 2>/dev/null | wc -l)
        [ "$state" = Z ] && [ "$threads" -le 1 ] && break
        sleep 0.02
        i=$((i + 1))
    done
    kill -s KILL "$pid" 2>/dev/null || true
    rm -f "$dir/tgtd.pid"
    ;;
*)
    echo "usage: $0 start <dir> <port> <control-port> | target <control-port> <tid> <iqn> <file> [<user> <secret>] | stop <dir> [KILL]" >&2
    exit 2
    ;;
esac
