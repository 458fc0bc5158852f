#!/usr/bin/env bash
# Builds, offline, a small OCI image layout for the tests (tag `test`) with umoci, for
# `deploy/build-rootfs.sh --from oci:OUTDIR`:
#   layer 1: busybox-static (/bin/busybox and its applet symlinks), /etc/passwd (root, and
#            sandbox uid 1000 gid 1000 home /home/sandbox), /etc/group, /home/sandbox and /work
#            owned by 1000:1000, and /etc/doomed.txt;
#   layer 2: deletes /etc/doomed.txt (a whiteout) and adds /etc/layer2.txt ("second layer").
#   config:  Env PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin and GREETING=hello from oci,
#            WorkingDir /work, User sandbox.
#
# Usage: deploy/build-oci-test-image.sh OUTDIR
# Idempotent: a layout already built by this script from the same busybox is kept (so its digests,
# and images cached from it, stay the same); prints the layout's absolute path as its last line.
# Needs root (the layers keep the files' owners).
set -euo pipefail

usage() { sed -n '2,14p' "$0"; exit 2; }
[ $# -eq 1 ] || usage
case "$1" in -h|--help) usage ;; esac
out=$1
tag="test"
die() { echo "build-oci-test-image.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (the layers record the files' owners)"

need=()
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v umoci >/dev/null 2>&1 || need+=(umoci)
command -v jq >/dev/null 2>&1 || need+=(jq)
if [ "${#need[@]}" -gt 0 ]; then
    echo "build-oci-test-image.sh: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${need[@]}" >&2 || { apt-get update -qq >&2 && apt-get install -y -qq "${need[@]}" >&2; }
fi
busybox=$(dpkg -L busybox-static | grep -E '/bin/busybox$' | head -n1)

stamp_name=.dormouse-test-image
stamp=$( { cat "$0"; sha256sum <"$busybox"; } | sha256sum | cut -c1-64)
if [ -f "$out/$stamp_name" ] && [ "$(cat "$out/$stamp_name")" = "$stamp" ] && [ -f "$out/index.json" ]; then
    echo "build-oci-test-image.sh: $out is up to date" >&2
    (cd "$out" && pwd)
    exit 0
fi
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ] && [ ! -f "$out/oci-layout" ]; then
    die "$out exists and is not an OCI layout: not replacing it"
fi

mkdir -p "$(dirname "$out")"
new="$out.tmp.$$"
work=$(mktemp -d)
trap 'rm -rf "$work" "$new"' EXIT
bundle="$work/bundle"

umoci init --layout "$new" >&2
umoci new --image "$new:$tag" >&2
umoci unpack --image "$new:$tag" "$bundle" >&2
rootfs="$bundle/rootfs"

# Layer 1: busybox, users, homes, the file layer 2 deletes.
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,home/sandbox,work}
chmod 1777 "$rootfs/tmp"
chmod 700 "$rootfs/root"
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] && continue
    ln -sf /bin/busybox "$rootfs/bin/$applet"
done
cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
sandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
sandbox:x:1000:
EOF
chown 1000:1000 "$rootfs/home/sandbox" "$rootfs/work"
echo "this file is deleted by the second layer" >"$rootfs/etc/doomed.txt"
umoci repack --refresh-bundle --image "$new:$tag" --history.created_by "dormouse test layer 1: busybox, users, /work, /etc/doomed.txt" "$bundle" >&2

# Layer 2: a whiteout for /etc/doomed.txt, and a new file.
rm "$rootfs/etc/doomed.txt"
echo "second layer" >"$rootfs/etc/layer2.txt"
umoci repack --image "$new:$tag" --history.created_by "dormouse test layer 2: rm /etc/doomed.txt, add /etc/layer2.txt" "$bundle" >&2

umoci config --image "$new:$tag" \
    --config.env "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" \
    --config.env "GREETING=hello from oci" \
    --config.workingdir /work --config.user sandbox >&2
umoci gc --layout "$new" >&2

# Check what was made: two layers, the second with the whiteout and the new file, the config.
blob() { local d=$1; printf '%s/blobs/%s/%s' "$new" "${d%%:*}" "${d#*:}"; }
manifest=$(blob "$(jq -r --arg t "$tag" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$new/index.json")")
layers=$(jq -r '.layers[].digest' "$manifest")
[ "$(wc -l <<<"$layers")" = 2 ] || die "expected 2 layers, got: $layers"
layer2=$(tail -n1 <<<"$layers")
# Listed first, then searched: `tar | grep -q` under pipefail fails whenever grep exits before
# tar has written everything (SIGPIPE), which depends on timing.
layer2_files=$(tar -tzf "$(blob "$layer2")")
grep -qE '^(\./)?etc/\.wh\.doomed\.txt$' <<<"$layer2_files" || die "layer 2 has no whiteout for /etc/doomed.txt"
grep -qE '^(\./)?etc/layer2\.txt$' <<<"$layer2_files" || die "layer 2 has no /etc/layer2.txt"
config=$(blob "$(jq -r '.config.digest' "$manifest")")
[ "$(jq -r '.config.User + " " + .config.WorkingDir' "$config")" = "sandbox /work" ] || die "config User/WorkingDir not set"
jq -e '.config.Env | index("GREETING=hello from oci")' "$config" >/dev/null || die "config Env not set"

echo "$stamp" >"$new/$stamp_name"
rm -rf "$out"
mv "$new" "$out"
echo "build-oci-test-image.sh: OCI layout $out, tag $tag" >&2
(cd "$out" && pwd)
