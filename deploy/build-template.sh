#!/usr/bin/env bash
# Builds a template: a root filesystem image booted once, its agent up, checkpointed, so that
# sandboxes start from it in milliseconds (`SandboxConfig::template(DIR)` in the library,
# `dormouse restore --dir DIR --rootfs COPY` from the CLI).
#
# Usage: deploy/build-template.sh base [--out DIR] [--mem MIB] [--vcpus N] [-- build-rootfs.sh args]
#   base   the worker's `base` template: the Debian image (build-rootfs.sh --from debian) with
#          bash, coreutils, procps, iproute2, ping, ca-certificates, apt and the agent as init
#   --out  where the template goes; default: the cache, keyed by the image, the kernel and the
#          dormouse binary (a template made by another dormouse version is never picked up):
#          ${XDG_CACHE_HOME:-~/.cache}/dormouse/template-base-<hash>/
# The template has no network device: sandboxes made from it get none (give `dormouse template
# create` --tap/--guest-ip/--dns for one with eth0). Uses the release dormouse binary
# (built if missing; DORMOUSE_BIN overrides). Prints the template's directory as its last line.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/dormouse"

[ $# -ge 1 ] || { sed -n '2,15p' "$0" >&2; exit 2; }
name=$1
shift
out=""
mem=256
vcpus=1
rootfs_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --vcpus) vcpus=$2; shift 2 ;;
        --) shift; rootfs_args=("$@"); break ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "build-template.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
case "$name" in
    base) image_args=(--from debian "${rootfs_args[@]}") ;;
    *) echo "build-template.sh: unknown template '$name' (known: base)" >&2; exit 2 ;;
esac

kernel_dir=$("$root/deploy/setup.sh" | tail -n1)
kernel="$kernel_dir/vmlinux"
if [ -n "${DORMOUSE_BIN:-}" ]; then
    dormouse=$DORMOUSE_BIN
else
    target_dir=${CARGO_TARGET_DIR:-$root/target}
    (cd "$root" && cargo build --release --locked -p dormouse --bin dormouse 2>&1 | tail -n 2 >&2)
    dormouse="$target_dir/x86_64-unknown-linux-gnu/release/dormouse"
    [ -x "$dormouse" ] || dormouse="$target_dir/release/dormouse"
fi
image=$("$root/deploy/build-rootfs.sh" "${image_args[@]}" | tail -n1)

if [ -z "$out" ]; then
    key=$( (echo "$name mem=$mem vcpus=$vcpus"; readlink -f "$image"; readlink -f "$kernel"; \
            sha256sum <"$dormouse") | sha256sum | cut -c1-16)
    out="$cache_root/template-$name-$key"
    if [ -f "$out/state.bin" ] && [ -f "$out/sandbox.json" ]; then
        echo "build-template.sh: cached template at $out" >&2
        echo "$out"
        exit 0
    fi
fi
mkdir -p "$(dirname "$out")"
# Into a fresh directory, then renamed: an interrupted build never leaves a half template where
# a later run would take it for a finished one.
tmp="$out.tmp.$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "build-template.sh: booting $image (a Linux boot under an emulating host takes up to a minute)" >&2
"$dormouse" template create --kernel "$kernel" --rootfs "$image" --out "$tmp" \
    --mem "$mem" --vcpus "$vcpus" --warm "bash -c true" >&2
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "build-template.sh: template at $out" >&2
echo "$out"
