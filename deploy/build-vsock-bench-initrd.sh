#!/usr/bin/env bash
# Builds the vsock test guest program (tests/guest-vsock, `dormouse-vsock-test`) as a static
# binary and an initrd whose /init serves its ports (deploy/build-initrd.sh), for
# `dormouse bench vsock --kernel K --vsock-initrd I`.
#
# Usage: deploy/build-vsock-bench-initrd.sh [--out FILE]
#   --out  where to write the initrd (default: ~/.cache/dormouse/vsock-bench.cpio)
# The static binary is built in $DORMOUSE_GUEST_TOOLS_DIR, else "${CARGO_TARGET_DIR:-target}/guest-tools"
# (the same place the e2e tests build it).
# Prints the initrd's absolute path as its last line.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "build-vsock-bench-initrd.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if [ -z "$out" ]; then
    mkdir -p "${XDG_CACHE_HOME:-$HOME/.cache}/dormouse"
    out="${XDG_CACHE_HOME:-$HOME/.cache}/dormouse/vsock-bench.cpio"
fi

triple=x86_64-unknown-linux-gnu
target_dir=${DORMOUSE_GUEST_TOOLS_DIR:-${CARGO_TARGET_DIR:-$root/target}/guest-tools}
# Static, and untouched by whatever flags the caller's own builds use.
(cd "$root" && env -u CARGO_ENCODED_RUSTFLAGS -u CARGO_BUILD_RUSTFLAGS -u CARGO_BUILD_TARGET \
    CARGO_TARGET_DIR="$target_dir" RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --target "$triple" -p guest-vsock --bin dormouse-vsock-test >&2)
bin="$target_dir/$triple/release/dormouse-vsock-test"
grep -Eq "statically linked|static-pie linked" <<<"$(file "$bin" 2>/dev/null)" \
    || { echo "build-vsock-bench-initrd.sh: $bin is not statically linked" >&2; exit 1; }

# Not exec'd: the program must not be PID 1 (its exit would panic the kernel).
"$root/deploy/build-initrd.sh" --out "$out" \
    --command "/bin/dormouse-vsock-test serve" \
    --add "$bin:/bin/dormouse-vsock-test" | tail -n1
