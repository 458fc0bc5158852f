#!/usr/bin/env bash
# Runs every cargo-fuzz target of tests/fuzz for a while (docs/fuzzing.md), each starting from a
# scratch copy of its committed seeds, and fails on any crash, timeout or out-of-memory (printing
# the saved input and the command that reproduces it).
#
#   deploy/fuzz.sh [TARGET...]           all targets when none is named
#
# Environment: DORMOUSE_FUZZ_SECONDS (per target, default 20), DORMOUSE_FUZZ_RUNS (stop a target
# after this many executions, for long runs; default unlimited), DORMOUSE_FUZZ_RSS_MB (default
# 2048), DORMOUSE_FUZZ_JOBS_DIR (where corpora and logs go; default a temporary directory).
# Needs a nightly toolchain: without one it says so and exits 0, unless CI is set (then it
# fails). cargo-fuzz is installed once per machine if missing.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
fuzz_dir=tests/fuzz
seconds=${DORMOUSE_FUZZ_SECONDS:-20}
rss_mb=${DORMOUSE_FUZZ_RSS_MB:-2048}
# Same flags for build and run, or `run` rebuilds: debug assertions on (integer overflow panics).
build_flags=(--fuzz-dir "$fuzz_dir" --debug-assertions)

if ! cargo +nightly --version >/dev/null 2>&1; then
    if [[ -n "${CI:-}" ]]; then
        echo "fuzz.sh: no nightly toolchain, and CI is set: fuzzing cannot run (rustup toolchain install nightly)" >&2
        exit 1
    fi
    echo "skipped fuzzing: no nightly toolchain (rustup toolchain install nightly)" >&2
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (once per machine)" >&2
    cargo install cargo-fuzz --locked --version '^0.13'
fi

if (($# > 0)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir "$fuzz_dir")
fi

start=$SECONDS
echo "fuzz.sh: building the fuzz targets (instrumented, once for all)" >&2
build_log=$(mktemp -t dormouse-fuzz-build.XXXXXX)
if ! cargo +nightly fuzz build "${build_flags[@]}" >"$build_log" 2>&1; then
    # The compiler's first errors are what matter; cargo-fuzz's backtrace follows them.
    grep -E -A 12 '^error' "$build_log" | head -n 80 >&2 || tail -n 40 "$build_log" >&2
    echo "fuzz.sh: FAILED: the fuzz targets do not build" >&2
    rm -f "$build_log"
    exit 1
fi
tail -n 2 "$build_log" >&2
rm -f "$build_log"
echo "fuzz.sh: built in $((SECONDS - start)) s" >&2

work=${DORMOUSE_FUZZ_JOBS_DIR:-}
if [[ -z "$work" ]]; then
    work=$(mktemp -d -t dormouse-fuzz.XXXXXX)
    trap 'rm -rf "$work"' EXIT
fi
# Crash inputs are kept where the repro command finds them (git-ignored).
artifacts="$root/$fuzz_dir/artifacts"
failed=()
for target in "${targets[@]}"; do
    seeds="$fuzz_dir/seeds/$target"
    if [[ ! -d "$seeds" ]]; then
        echo "fuzz.sh: $target has no committed seeds in $seeds" >&2
        failed+=("$target")
        continue
    fi
    corpus="$work/corpus/$target"
    mkdir -p "$corpus" "$artifacts/$target"
    cp -a "$seeds/." "$corpus/"
    extra=()
    if [[ -n "${DORMOUSE_FUZZ_RUNS:-}" ]]; then
        extra+=(-runs="$DORMOUSE_FUZZ_RUNS")
    fi
    case "$target" in
        # Room for re-encoded states with more vCPUs/devices than the seeds.
        vm_state) extra+=(-max_len=262144) ;;
        # Descriptor tables are 16 bytes per entry.
        mmio_transport | virtio_net_rxtx | vsock_device | virtio_balloon) extra+=(-max_len=8192) ;;
    esac
    log="$work/$target.log"
    echo "fuzz.sh: $target for ${seconds}s" >&2
    target_start=$SECONDS
    set +e
    cargo +nightly fuzz run "${build_flags[@]}" "$target" "$corpus" -- \
        -max_total_time="$seconds" -rss_limit_mb="$rss_mb" -malloc_limit_mb="$rss_mb" \
        -timeout=10 -artifact_prefix="$artifacts/$target/" -print_final_stats=1 \
        "${extra[@]}" >"$log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if ((rc != 0)); then
        failed+=("$target")
        echo "fuzz.sh: FAILED: $target (exit $rc) after ${execs:-?} runs; the end of its log:" >&2
        grep -v '^#[0-9]' "$log" | tail -n 40 >&2
        artifact=$(ls -t "$artifacts/$target"/{crash,timeout,oom,leak,slow-unit}-* 2>/dev/null | head -n 1 || true)
        if [[ -n "$artifact" ]]; then
            echo "fuzz.sh: input: $artifact" >&2
            echo "fuzz.sh: reproduce: cargo +nightly fuzz run ${build_flags[*]} $target $artifact" >&2
        fi
    else
        echo "fuzz.sh: ok: $target, ${execs:-?} runs in $((SECONDS - target_start)) s" >&2
    fi
done
echo "fuzz.sh: ${#targets[@]} targets in $((SECONDS - start)) s" >&2
if ((${#failed[@]} > 0)); then
    echo "fuzz.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
