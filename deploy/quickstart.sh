#!/usr/bin/env bash
# The main job: set up the host, build dormouse and a guest, and boot a sandbox with its console on
# this terminal. Exit the guest shell (or press Ctrl-A x) to end the VM.
#
# The guest's init is the dormouse agent; it starts a shell on the console (build-rootfs.sh
# --shell). Without extra arguments the VM also gets vsock and an API socket, so from another
# terminal `dormouse exec --sock $SOCK -- uname -a` and `dormouse cp --sock $SOCK FILE vm:/tmp/`
# work. Extra arguments replace those and go to `dormouse run`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

kernel_dir=$("$root/deploy/setup.sh" | tail -n1)
target_dir=${CARGO_TARGET_DIR:-$root/target}
cargo build --release --locked -p dormouse --bin dormouse 2>&1 | tail -n 2 >&2
rootfs=$("$root/deploy/build-rootfs.sh" --shell | tail -n1)
extra=("$@")
if [ "${#extra[@]}" -eq 0 ]; then
    sock="${XDG_RUNTIME_DIR:-/tmp}/dormouse-quickstart.sock"
    extra=(--vsock cid=3 --api-sock "$sock")
    echo "quickstart: from another terminal: $target_dir/x86_64-unknown-linux-gnu/release/dormouse exec --sock $sock -- uname -a" >&2
fi
echo "quickstart: booting $kernel_dir/vmlinux with root filesystem $rootfs (virtio-blk)" >&2
exec "$target_dir/x86_64-unknown-linux-gnu/release/dormouse" run --kernel "$kernel_dir/vmlinux" --rootfs "$rootfs" "${extra[@]}"
