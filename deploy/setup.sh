#!/usr/bin/env bash
# Installs what dormouse's build, guest images and tests need on a Debian host (run as root), and
# builds (or finds in the cache) the guest kernel. Idempotent and quick on a prepared machine.
# Prints the guest kernel's cache directory as its last line.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup.sh: cargo is missing: dormouse needs a Rust toolchain (stable >= 1.85) on PATH" >&2
    exit 1
fi

pkgs=()
need() { dpkg -s "$1" >/dev/null 2>&1 || pkgs+=("$1"); }
# gcc: the hostile test guest (tests/hostile-guest) is freestanding C built at test time.
# mmdebstrap, umoci, skopeo: Debian and container-image root filesystems (build-rootfs.sh --from);
# dnsmasq-base: the name server the image network test runs on the TAP's host side.
for p in busybox-static e2fsprogs iproute2 python3 lz4 iptables file gcc \
         mmdebstrap umoci skopeo dnsmasq-base; do need "$p"; done
if [ "${#pkgs[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup.sh: missing Debian packages: ${pkgs[*]} (run as root to install them)" >&2
        exit 1
    fi
    echo "setup.sh: installing ${pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2
fi

if [ ! -e /dev/kvm ]; then
    echo "setup.sh: warning: /dev/kvm is missing; load kvm_intel/kvm_amd (or kvm_pvm) first" >&2
fi

# SeaweedFS, the S3-compatible server the snapshot store's tests start (tests/tests/store.rs).
"$here/install-seaweedfs.sh" >&2

"$here/../guest-kernel/build.sh" --print-dir
