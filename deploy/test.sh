#!/usr/bin/env bash
# The whole test suite: sets the machine up (deploy/setup.sh), builds every binary, then runs unit
# and end-to-end tests. End-to-end tests boot real guests through /dev/kvm; with CI set, a missing
# /dev/kvm fails them instead of skipping.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

kernel_dir=$("$root/deploy/setup.sh" | tail -n1)
export DORMOUSE_KERNEL_DIR="$kernel_dir"
echo "test.sh: guest kernel in $kernel_dir" >&2

cargo build --workspace --bins --tests --locked 2>&1 | tail -n 3 >&2
# The end-to-end tests boot guests whose kernel may run under emulation: keep them few at a time.
cargo test --workspace --locked --no-fail-fast -- --test-threads "${DORMOUSE_TEST_THREADS:-2}"
