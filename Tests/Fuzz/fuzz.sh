#!/usr/bin/env bash
# The one way to run ScsiGate's libFuzzer targets (sources: Tests/Fuzz/Targets, seeds: Tests/Fuzz/Corpus/TARGET).
#
#   fuzz.sh --list                  the target names, one per line
#   fuzz.sh TARGET SECONDS [ARGS]   builds if needed, fuzzes TARGET for SECONDS (extra ARGS go to libFuzzer);
#                                   exits non-zero on a crash, leak or timeout and prints the reproducer's path
#                                   (long runs of the threaded targets: add -fork=2, two worker processes)
#   fuzz.sh --all SECONDS           one build, every target for SECONDS each (what CI runs)
#   fuzz.sh --build                 only the build
#
# The build is `swift build -c release --sanitize fuzzer -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING` of the
# product scsigate-fuzz into .build/fuzz (its own scratch path: the normal .build is untouched). Runs keep
# their growing corpus in .build/fuzz-runs/TARGET/corpus (the committed seeds are read, never written) and
# reproducers in .build/fuzz-runs/TARGET/artifacts. Replay one with
#   SCSIGATE_FUZZ_TARGET=TARGET $(fuzz.sh --bin) FILE
# and turn it into a regression: fix, copy the file into Tests/Fuzz/Corpus/TARGET (CorpusReplayTests replays it
# in `swift test`), add a focused unit test. Long runs on a shared machine: `nice -n 19 fuzz.sh TARGET 600`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
source Deploy/lib.sh

SCRATCH="$ROOT/.build/fuzz"
RUNS="$ROOT/.build/fuzz-runs"
CORPUS="$ROOT/Tests/Fuzz/Corpus"
BUILD=(swift build -c release --scratch-path "$SCRATCH" --sanitize fuzzer -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING --product scsigate-fuzz)

targets() { for d in "$CORPUS"/*/; do basename "$d"; done; }

build() {
    sg_require_swift
    sg_log "fuzz build: ${BUILD[*]}"
    # (ld.gold warns about every ASan helper symbol it cannot export: noise, dropped)
    "${BUILD[@]}" 2>&1 | grep -v "Cannot export local symbol" >&2
    [ "${PIPESTATUS[0]}" -eq 0 ] || sg_die "fuzz build failed"
}

bin() { echo "$("${BUILD[@]}" --show-bin-path)/scsigate-fuzz"; }

# run TARGET SECONDS [ARGS...]: 0 when the run ended without a finding.
run() {
    local target=$1 seconds=$2
    shift 2
    [ -d "$CORPUS/$target" ] || sg_die "unknown target '$target' (fuzz.sh --list)"
    [[ "$seconds" =~ ^[0-9]+$ ]] || sg_die "SECONDS must be a whole number, not '$seconds'"
    local exe work status
    exe=$(bin)
    [ -x "$exe" ] || build
    work="$RUNS/$target"
    mkdir -p "$work/corpus" "$work/artifacts"
    local before leaks=1
    before=$(ls "$work/artifacts" | wc -l)
    # TOMLKit 0.6.0 (the TOML parser the config loader uses) leaks on every parse: TOMLTable(string:) never frees
    # its error record, TOMLTable.keys the key array, value getters their C strings. Leak checking is off for the
    # two targets that parse TOML (config; jsonrpc through lun.add and config.save); crashes and timeouts count.
    case $target in config|jsonrpc) leaks=0 ;; esac
    sg_log "fuzzing $target for ${seconds}s"
    set +e
    (cd "$work" && SCSIGATE_FUZZ_TARGET="$target" SWIFT_BACKTRACE=enable=no \
        ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=$leaks}" LSAN_OPTIONS="suppressions=$ROOT/Tests/Fuzz/lsan.supp" \
        "$exe" "$work/corpus" "$CORPUS/$target" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=3072 \
        -artifact_prefix="$work/artifacts/" -print_final_stats=1 -detect_leaks="$leaks" "$@" 2>&1 | tee "$work/last.log" | grep -E "^#[0-9]+ +(DONE|INITED)|^stat::|ERROR|==[0-9]+==|Test unit written|SUMMARY|Fatal error|deadly signal|timeout" >&2)
    status=${PIPESTATUS[0]}
    set -e
    local execs rate
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/last.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/last.log" | tail -1)
    if [ -z "$execs" ]; then
        # -fork=N (several worker processes; for long runs) prints no final stats: its last "#EXECS: cov: ... time: Ns" line.
        local last
        last=$(grep -E '^#[0-9]+: cov: .* time: [0-9]+s' "$work/last.log" | tail -1)
        execs=$(sed -n 's/^#\([0-9]*\): .*/\1/p' <<<"$last")
        local t
        t=$(sed -n 's/.* time: \([0-9]*\)s.*/\1/p' <<<"$last")
        [ -n "$execs" ] && [ "${t:-0}" -gt 0 ] && rate=$((execs / t))
    fi
    if [ "$status" -ne 0 ] || [ "$(ls "$work/artifacts" | wc -l)" -ne "$before" ]; then
        local f
        for f in $(ls -t "$work/artifacts" | head -3); do sg_log "reproducer: $work/artifacts/$f"; done
        sg_log "$target: FAILED (exit $status) after ${execs:-?} executions; log: $work/last.log"
        return 1
    fi
    echo "$target: ${execs:-0} executions, ${rate:-0} exec/s, 0 crashes"
}

case "${1:-}" in
    --list) targets ;;
    --build) build ;;
    --bin) bin ;;
    --all)
        [ $# -eq 2 ] || sg_die "usage: fuzz.sh --all SECONDS"
        build
        failed=()
        for t in $(targets); do run "$t" "$2" || failed+=("$t"); done
        [ ${#failed[@]} -eq 0 ] || sg_die "fuzz targets with findings: ${failed[*]}"
        ;;
    ""|-h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
    *)
        [ $# -ge 2 ] || sg_die "usage: fuzz.sh TARGET SECONDS [libFuzzer args]"
        run "$@"
        ;;
esac
