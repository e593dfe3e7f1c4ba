# Helpers shared by the benchmark scripts (sourced after Deploy/lib.sh): gateway configs and start-up.

# bench_wait_socket PATH: waits up to 10 s for a UNIX socket to appear.
bench_wait_socket() { sg_wait 10 test -S "$1"; }

# bench_lun BACKEND PATH: the [[controller.lun]] keys of a null (256 MiB), direct (O_DIRECT file) or
# cached (page-cache file) LUN; PATH is the file (unused for null).
bench_lun() {
    case $1 in
        null) printf 'backend = "null"\nsize = "256M"\n' ;;
        direct) printf 'backend = "file"\npath = "%s"\ncache = "none"\n' "$2" ;;
        cached) printf 'backend = "file"\npath = "%s"\ncache = "writeback"\n' "$2" ;;
        *) sg_die "unknown back-end: $1" ;;
    esac
}

# bench_gateway DIR: the [gateway] table of a gateway whose state and control socket live in DIR.
bench_gateway() {
    printf '[gateway]\nstate_dir = "%s/state"\ncontrol_socket = "%s/control.sock"\nlog_level = "warning"\n' "$1" "$1"
}

# bench_controller NAME TRANSPORT SOCKET LUN-KEYS: one controller with one queue of 256 and LUN 0.
bench_controller() {
    printf '\n[[controller]]\nname = "%s"\ntransport = "%s"\nsocket = "%s"\nqueues = 1\nqueue_size = 256\n\n[[controller.lun]]\nlun = 0\n%s\n' \
        "$1" "$2" "$3" "$4"
}

# bench_binary: the scsigate binary to measure: $SCSIGATE_BIN, or this tree's release build.
bench_binary() {
    if [ -n "${SCSIGATE_BIN:-}" ]; then
        echo "$SCSIGATE_BIN"
    else
        swift build -c release --product scsigate >&2 || sg_die "swift build -c release failed"
        echo "$(swift build -c release --show-bin-path)/scsigate"
    fi
}
