#!/usr/bin/env bash
# The main job: set up the host, build dormouse and a guest, and boot a sandbox with its console on
# this terminal. Exit the guest shell (or press Ctrl-A x) to end the VM.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

kernel_dir=$("$root/deploy/setup.sh" | tail -n1)
target_dir=${CARGO_TARGET_DIR:-$root/target}
cargo build --release --locked -p vmm --bin dormouse 2>&1 | tail -n 2 >&2
rootfs=$("$root/deploy/build-rootfs.sh" | tail -n1)
echo "quickstart: booting $kernel_dir/vmlinux with root filesystem $rootfs (virtio-blk)" >&2
exec "$target_dir/release/dormouse" run --kernel "$kernel_dir/vmlinux" --rootfs "$rootfs" "$@"
