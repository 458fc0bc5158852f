#!/usr/bin/env bash
# The whole test suite: sets the machine up (deploy/setup.sh), checks formatting and clippy (the
# gates: either failing stops here), builds every binary, runs unit and end-to-end tests, then
# runs every fuzz target briefly (deploy/fuzz.sh). End-to-end tests boot real guests through
# /dev/kvm; with CI set, a missing /dev/kvm (or nightly toolchain, for fuzzing) fails them
# instead of skipping.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

kernel_dir=$("$root/deploy/setup.sh" | tail -n1)
export DORMOUSE_KERNEL_DIR="$kernel_dir"
echo "test.sh: guest kernel in $kernel_dir" >&2

if ! cargo fmt --all --check; then
    echo "test.sh: FAILED: cargo fmt --all --check (run \`cargo fmt --all\`)" >&2
    exit 1
fi
# The fuzz targets are their own workspace: formatted like the rest.
if ! cargo fmt --manifest-path tests/fuzz/Cargo.toml --check; then
    echo "test.sh: FAILED: cargo fmt --manifest-path tests/fuzz/Cargo.toml --check" >&2
    exit 1
fi
if ! cargo clippy --workspace --all-targets --locked -- -D warnings; then
    echo "test.sh: FAILED: cargo clippy --workspace --all-targets --locked -- -D warnings" >&2
    exit 1
fi

cargo build --workspace --bins --tests --locked 2>&1 | tail -n 3 >&2
# The end-to-end tests boot guests whose kernel may run under emulation: keep them few at a time.
cargo test --workspace --locked --no-fail-fast -- --test-threads "${DORMOUSE_TEST_THREADS:-2}"

# After the tests (a failing test stops before this build): the instrumented build is its own
# (nightly, tests/fuzz/target), then ~20 s per target.
"$root/deploy/fuzz.sh"
