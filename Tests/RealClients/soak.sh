#!/usr/bin/env bash
# Soak run of SECONDS (default 1800): the `soak` suite of ci.sh (suites/soak.sh) with that fio run time.
# Prints fds and private RSS (RssAnon) of the gateway after warm-up and at the end, and fails on > 5 % growth of either, on a
# verify error or on a failed CLI call. Run it nice'd on a shared machine: nice -n 19 Tests/RealClients/soak.sh 1800
set -euo pipefail
secs=${1:-1800}
case $secs in ''|*[!0-9]*) echo "usage: soak.sh [SECONDS]" >&2; exit 2 ;; esac
SCSIGATE_SOAK_SECONDS=$secs exec bash "$(dirname "$0")/ci.sh" soak
