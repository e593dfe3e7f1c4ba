#!/usr/bin/env bash
# Builds the vhost-user benchmark client: build.sh [OUTPUT] (default: .build/vhost-bench in the repo).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE/../../.build/vhost-bench}
mkdir -p "$(dirname "$OUT")"
cc -O2 -Wall -Wextra -Werror -pthread -o "$OUT" "$HERE/vhost-bench.c"
echo "$OUT"
