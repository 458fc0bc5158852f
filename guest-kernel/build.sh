#!/usr/bin/env bash
# Builds dormouse's guest kernel (vmlinux + LZ4 bzImage) from Debian's linux-source-6.12,
# with the config and patches in this folder, and caches the result under
#   ${XDG_CACHE_HOME:-$HOME/.cache}/dormouse/kernel-<hash>/
# keyed by a hash of the config, the patches and this script. The last line printed is the
# absolute path of the vmlinux. A warm cache answers in well under a second.
#
# Options:
#   --print-dir     print the cache directory instead of the vmlinux path (last line)
#   --no-install    do not apt-get anything (fail if tools are missing)
#   --jobs N        make jobs (default: nproc); 1 keeps a shared machine responsive
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/dormouse
print_dir=0
install=1
jobs=$(nproc)
while [ "$#" -gt 0 ]; do
    case "$1" in
        --print-dir) print_dir=1 ;;
        --no-install) install=0 ;;
        --jobs) shift; jobs=${1:?--jobs needs a number} ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

key=$(cat "$here/config" "$here"/patches/*.patch "$here/build.sh" | sha256sum | cut -c1-16)
out="$cache_root/kernel-$key"

finish() {
    if [ "$print_dir" = 1 ]; then echo "$out"; else echo "$out/vmlinux"; fi
}

if [ -s "$out/vmlinux" ] && [ -s "$out/bzImage" ]; then
    finish
    exit 0
fi

log() { echo "guest-kernel: $*" >&2; }

need_pkgs=()
[ -f /usr/src/linux-source-6.12.tar.xz ] || need_pkgs+=(linux-source-6.12)
for tool_pkg in gcc:gcc make:make flex:flex bison:bison bc:bc lz4:lz4 xz:xz-utils patch:patch \
        perl:perl; do
    command -v "${tool_pkg%%:*}" >/dev/null 2>&1 || need_pkgs+=("${tool_pkg#*:}")
done
for hdr_pkg in /usr/include/libelf.h:libelf-dev /usr/include/openssl/ssl.h:libssl-dev; do
    [ -f "${hdr_pkg%%:*}" ] || need_pkgs+=("${hdr_pkg#*:}")
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    if [ "$install" = 0 ]; then
        log "missing packages: ${need_pkgs[*]} (run without --no-install, as root)"
        exit 1
    fi
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi

mkdir -p "$cache_root"
work=$(mktemp -d "$cache_root/kernel-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "unpacking linux-source-6.12 into $work"
tar -C "$work" -xf /usr/src/linux-source-6.12.tar.xz
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n1)
for p in "$here"/patches/*.patch; do
    log "applying $(basename "$p")"
    patch -d "$src" -p1 --forward --no-backup-if-mismatch -s <"$p" >&2
done
cp "$here/config" "$src/.config"
make -C "$src" -s olddefconfig >&2
# olddefconfig drops options whose dependencies are missing without a word: fail instead.
missing=0
while IFS= read -r opt; do
    if ! grep -qx "$opt" "$src/.config"; then
        log "config: $opt was dropped by olddefconfig (a dependency is missing)"
        missing=1
    fi
done < <(grep -E '^CONFIG_[A-Z0-9_]+=y$' "$here/config")
[ "$missing" = 0 ] || exit 1
log "building vmlinux and bzImage with $jobs jobs (a few minutes)"
start=$(date +%s)
make -C "$src" -s -j"$jobs" vmlinux bzImage KCFLAGS="-pipe" >&2
log "built in $(( $(date +%s) - start )) s"

staging="$work/out"
mkdir -p "$staging"
cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" "$src/.config" "$src/System.map" "$staging/"
strip --strip-debug "$staging/vmlinux" 2>/dev/null || true
rm -rf "$out"
mv "$staging" "$out"
finish
