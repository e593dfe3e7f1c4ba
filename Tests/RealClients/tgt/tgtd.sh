#!/usr/bin/env bash
# The one driver of a private tgtd (Debian's stgt) on 127.0.0.1, for the Swift tests (TestSupport's
# TgtTarget) and the real-client suites. Each instance has its own control port (tgtd's unix socket
# /var/run/tgtd/socket.N, so it never touches another tgtd) and keeps tgtd.pid and tgtd.log in its DIR;
# tgtd is stopped by that pid, never by name.
#
#   tgtd.sh start DIR PORT CONTROL-PORT
#       Installs tgt when tgtd is missing (as root), starts `tgtd -f` listening on 127.0.0.1:PORT and
#       waits until tgtadm answers and the portal listens.
#   tgtd.sh target CONTROL-PORT TID IQN FILE [CHAP-USER CHAP-SECRET]
#       Creates target TID named IQN with LUN 1 on FILE, thin provisioning on (UNMAP and WRITE SAME with
#       UNMAP reach the file), bound to ALL initiators; with CHAP when a user and secret are given.
#   tgtd.sh addlun CONTROL-PORT TID LUN FILE
#       Adds a LUN to a running target (tgtd then raises REPORTED LUNS DATA HAS CHANGED on every session).
#   tgtd.sh luparam CONTROL-PORT TID LUN NAME=VALUE
#       Changes a LUN parameter of a running target (readonly=1: writes then fail with DATA PROTECT).
#   tgtd.sh serve DIR PORT CONTROL-PORT IQN FILE [SIZE]
#       (Re)starts the instance of DIR (the one running there is stopped first) with target 1 named IQN,
#       LUN 1 on FILE (created, or extended, to SIZE, default 256M; thin provisioning off, as a plain
#       reference target). Prints TGT_URL=iscsi://127.0.0.1:PORT/IQN/1 and TGT_PID=N.
#   tgtd.sh stop DIR [SIGNAL]
#       Stops the instance started in DIR (SIGKILL by default: tgtd ignores SIGTERM while it has targets)
#       and waits until it is gone.
# Reference: `iscsi-test-cu -d -t SCSI $TGT_URL` against tgt 1.0.85 gives 7 failed of 215.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../../../Deploy/lib.sh"

usage() { sed -n '7,23p' "$0" >&2; exit 2; }
number() { case $2 in ''|*[!0-9]*) sg_die "$1 must be a number: '$2'" ;; esac; }
tgt() { local cport=$1; shift; tgtadm -C "$cport" --lld iscsi "$@"; }

# pid_of DIR: the pid in DIR/tgtd.pid (nothing when there is none).
pid_of() { cat "$1/tgtd.pid" 2>/dev/null || true; }
# listening PORT: whether something listens on 127.0.0.1:PORT (tgtadm may answer before the portal does).
listening() { grep -q ":$(printf '%04X' "$1") 00000000:0000 0A" /proc/net/tcp 2>/dev/null; }
# answering CONTROL-PORT DIR: whether tgtadm answers; dies with tgtd's log when tgtd exited.
answering() {
    tgt "$1" --mode sys --op show >/dev/null 2>&1 && return 0
    kill -0 "$(pid_of "$2")" 2>/dev/null && return 1
    cat "$2/tgtd.log" >&2
    sg_is_root || sg_die "tgtd exited at start (log above): it needs root (its IPC lock file)"
    sg_die "tgtd exited at start (log above; portal port or control port $1 busy?)"
}
# gone PID: the process ended, or is a zombie whose other threads have all exited (only then are its
# files, the listening socket included, closed; the zombie itself may be reaped late).
gone() {
    kill -0 "$1" 2>/dev/null || return 0
    [ "$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)" = Z ] \
        && [ "$(ls "/proc/$1/task" 2>/dev/null | wc -l)" -le 1 ]
}

start() {  # start DIR PORT CONTROL-PORT
    local dir=$1 port=$2 cport=$3
    number PORT "$port"; number CONTROL-PORT "$cport"
    if ! command -v tgtd >/dev/null; then
        sg_is_root && sg_apt_install tgt
        command -v tgtd >/dev/null || sg_die "tgtd is not installed (Debian package tgt) and only root can install it"
    fi
    mkdir -p "$dir"
    mkdir -p /var/run/tgtd 2>/dev/null || true
    rm -f "/var/run/tgtd/socket.$cport" "/var/run/tgtd/socket.$cport.lock"
    setsid tgtd -f -C "$cport" --iscsi "portal=127.0.0.1:$port" >"$dir/tgtd.log" 2>&1 </dev/null &
    echo $! >"$dir/tgtd.pid"
    sg_wait 10 answering "$cport" "$dir" || { cat "$dir/tgtd.log" >&2; sg_die "tgtd did not answer on control port $cport"; }
    sg_wait 5 listening "$port" || { cat "$dir/tgtd.log" >&2; sg_die "tgtd answers on control port $cport but does not listen on 127.0.0.1:$port"; }
}

target() {  # target CONTROL-PORT TID IQN FILE [USER SECRET]
    local cport=$1 tid=$2 iqn=$3 file=$4
    tgt "$cport" --mode target --op new --tid "$tid" --targetname "$iqn"
    tgt "$cport" --mode logicalunit --op new --tid "$tid" --lun 1 --backing-store "$file"
    tgt "$cport" --mode logicalunit --op update --tid "$tid" --lun 1 --params thin_provisioning=1
    if [ $# -ge 6 ]; then
        tgt "$cport" --mode account --op new --user "$5" --password "$6" 2>/dev/null || true
        tgt "$cport" --mode account --op bind --tid "$tid" --user "$5"
    fi
    tgt "$cport" --mode target --op bind --tid "$tid" --initiator-address ALL
}

stop() {  # stop DIR [SIGNAL]
    local dir=$1 sig=${2:-KILL} pid
    pid=$(pid_of "$dir")
    [ -n "$pid" ] || return 0
    if grep -q tgtd "/proc/$pid/comm" 2>/dev/null; then
        kill -s "$sig" "$pid" 2>/dev/null || true
        sg_wait 5 gone "$pid" || true
        kill -s KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/tgtd.pid"
}

serve() {  # serve DIR PORT CONTROL-PORT IQN FILE [SIZE]
    local dir=$1 port=$2 cport=$3 iqn=$4 file=$5 size=${6:-256M}
    stop "$dir"
    mkdir -p "$(dirname "$file")"
    [ -e "$file" ] || truncate -s "$size" "$file"
    if [ -f "$file" ] && [ "$(stat -c %s "$file")" -lt "$(numfmt --from=iec "${size%B}")" ]; then
        truncate -s "$size" "$file"
    fi
    start "$dir" "$port" "$cport"
    tgt "$cport" --mode target --op new --tid 1 --targetname "$iqn"
    tgt "$cport" --mode logicalunit --op new --tid 1 --lun 1 --backing-store "$file"
    tgt "$cport" --mode target --op bind --tid 1 --initiator-address ALL
    sg_log "tgtd pid $(pid_of "$dir") serving $iqn LUN 1 = $file on 127.0.0.1:$port"
    echo "TGT_URL=iscsi://127.0.0.1:$port/$iqn/1"
    echo "TGT_PID=$(pid_of "$dir")"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
    start) [ $# = 3 ] || usage; start "$@" ;;
    target) [ $# = 4 ] || [ $# = 6 ] || usage; target "$@" ;;
    addlun) [ $# = 4 ] || usage; tgt "$1" --mode logicalunit --op new --tid "$2" --lun "$3" --backing-store "$4" ;;
    luparam) [ $# = 4 ] || usage; tgt "$1" --mode logicalunit --op update --tid "$2" --lun "$3" --params "$4" ;;
    serve) [ $# = 5 ] || [ $# = 6 ] || usage; serve "$@" ;;
    stop) [ $# = 1 ] || [ $# = 2 ] || usage; stop "$@" ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) usage ;;
esac
