#!/usr/bin/env bash
# Installs the peer VMMs `dormouse bench snapshot` compares itself with, as far as Debian has
# them: QEMU (qemu-system-x86). Firecracker and Cloud Hypervisor are not packaged by Debian:
# put their release binaries on PATH yourself (see below). Not part of CI or setup.sh: the
# benchmark works without peers and says which ones it did not find.
set -euo pipefail

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-peers.sh: run as root to install qemu-system-x86" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2
fi
echo "qemu-system-x86_64: $(command -v qemu-system-x86_64)"

for peer in firecracker cloud-hypervisor; do
    if command -v "$peer" >/dev/null 2>&1; then
        echo "$peer: $(command -v "$peer")"
    else
        echo "$peer: not found"
    fi
done
cat <<'TEXT'

Firecracker and Cloud Hypervisor: download a static x86_64 release binary and put it on PATH
under the name the benchmark looks for, e.g.
  install -m 755 firecracker-v1.x.y-x86_64 /usr/local/bin/firecracker
    (from https://github.com/firecracker-microvm/firecracker/releases)
  install -m 755 cloud-hypervisor-static /usr/local/bin/cloud-hypervisor
    (from https://github.com/cloud-hypervisor/cloud-hypervisor/releases)
Then: dormouse bench snapshot   (the runners for these two are verified against Firecracker
v1.16.1 and Cloud Hypervisor v53: see docs/bench-snapshot.md, "Peers").
TEXT
