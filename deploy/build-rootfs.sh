#!/usr/bin/env bash
# Builds an ext4 root filesystem image for dormouse guests: busybox-static, an init that mounts the
# essentials, configures the network from the kernel command line, and then starts a shell on the
# console or runs a given command. Made with `mkfs.ext4 -d` from a staging directory: no loop
# mounts, no root needed beyond installing packages.
#
# Usage: deploy/build-rootfs.sh [--out FILE] [--size MIB] [--command "SHELL COMMAND"] [--add SRC:DEST]...
#   --command  run this instead of an interactive shell, then reboot (the VM exits 0)
#   --add      copy a host file into the image (e.g. --add target/x:/usr/bin/x), repeatable
# Guest network: pass `dormouse.ip=ADDR/PREFIX[,GATEWAY]` on the kernel command line and init
# configures eth0 (see deploy/net.sh for the host side).
# Prints the image's absolute path as its last line.
set -euo pipefail

out="${XDG_CACHE_HOME:-$HOME/.cache}/dormouse/rootfs.ext4"
size=64
command=""
adds=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --command) command=$2; shift 2 ;;
        --add) adds+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "build-rootfs.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
case "$size" in ''|*[!0-9]*) echo "build-rootfs.sh: --size takes MiB, got '$size'" >&2; exit 2 ;; esac

need=()
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
if [ "${#need[@]}" -gt 0 ]; then
    echo "build-rootfs.sh: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${need[@]}" >&2 || { apt-get update -qq >&2 && apt-get install -y -qq "${need[@]}" >&2; }
fi
busybox=$(dpkg -L busybox-static | grep -E '/bin/busybox$' | head -n1)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,mnt,var/log}
chmod 1777 "$stage/tmp"
cp "$busybox" "$stage/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] && continue
    ln -sf /bin/busybox "$stage/bin/$applet"
done
echo "dormouse" >"$stage/etc/hostname"
echo "root:x:0:0:root:/root:/bin/sh" >"$stage/etc/passwd"
echo "root:x:0:" >"$stage/etc/group"

if [ -n "$command" ]; then
    run_part="$command
sync
reboot -f"
else
    run_part='echo "dormouse rootfs: shell on the console (exit reboots the VM; Ctrl-A x ends it from the host)"
setsid cttyhack sh -l
sync
reboot -f'
fi
cat >"$stage/sbin/init" <<INIT
#!/bin/sh
# dormouse rootfs init: essentials, network from dormouse.ip=, then the job.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
hostname -F /etc/hostname
for arg in \$(cat /proc/cmdline); do
    case "\$arg" in
        dormouse.ip=*)
            spec=\${arg#dormouse.ip=}
            addr=\${spec%%,*}
            gw=""
            [ "\$spec" != "\$addr" ] && gw=\${spec#*,}
            ip link set lo up
            ip addr add "\$addr" dev eth0 && ip link set eth0 up
            [ -n "\$gw" ] && ip route add default via "\$gw"
            ;;
    esac
done
$run_part
INIT
chmod 755 "$stage/sbin/init"

for spec in "${adds[@]}"; do
    src=${spec%%:*}
    dest=${spec#*:}
    mkdir -p "$stage/$(dirname "$dest")"
    cp "$src" "$stage/$dest"
done

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
rm -f "$tmp"
mkfs.ext4 -q -F -L dormouse-root -d "$stage" -E root_owner=0:0 "$tmp" "${size}M" >&2
mv "$tmp" "$out"
readlink -f "$out"
