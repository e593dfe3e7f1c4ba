#!/usr/bin/env bash
# Installs what is missing, builds ScsiGate (release) and runs the gateway in the foreground.
# Without arguments it serves the built-in default configuration (Config/scsigate.toml): one
# vhost-user-scsi controller on /run/scsigate/scsi0.sock with a 1 GiB sparse file LUN created as
# /var/lib/scsigate/disk0.img. Arguments are passed to `scsigate serve` (e.g. --config FILE).
# Run as root (it writes /var/lib/scsigate and /run/scsigate). Stop with Ctrl-C or SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
source Deploy/lib.sh

sg_apt_install "${SG_BUILD_PACKAGES[@]}"
sg_require_swift
sg_log "swift build -c release --product scsigate"
swift build -c release --product scsigate >&2
exec "$(swift build -c release --show-bin-path)/scsigate" serve "$@"
