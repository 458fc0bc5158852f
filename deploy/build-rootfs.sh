#!/usr/bin/env bash
# Builds an ext4 root filesystem image for dormouse guests: busybox-static and the dormouse guest
# agent (static), which runs as init by default. Made with `mkfs.ext4 -d` from a staging
# directory: no loop mounts, no root needed beyond installing packages.
#
# Usage: deploy/build-rootfs.sh [--out FILE] [--size MIB] [--init agent|busybox] [--agent PATH]
#                               [--no-agent] [--shell] [--command "SHELL COMMAND"] [--add SRC:DEST]...
#   --init     agent (default): /sbin/init is the agent (PID 1: mounts, reaping, gRPC on vsock
#              port 1024, readiness on host port 1023); it starts /etc/dormouse/rc, which
#              configures the network and then runs --command or --shell, if given.
#              busybox: a shell-script init (the agent, when included, runs in the background).
#   --out      where the image goes; default: a file in the cache keyed by every input (the agent
#              binary, the options, the added files, this script), so runs with different inputs
#              never overwrite each other's image:
#              ${XDG_CACHE_HOME:-~/.cache}/dormouse/rootfs-<hash>.ext4
#   --agent    use this static dormouse-agent binary instead of building it with cargo; without
#              it the agent is built once per source state into the cache, keyed like the
#              kernel (${XDG_CACHE_HOME:-~/.cache}/dormouse/agent-<hash>/dormouse-agent, a hash
#              of the agent's and protocol's sources, Cargo.lock, the toolchain and this
#              script; cargo's own files in .../agent-target/), never into the checkout's target/
#   --no-agent leave the agent out (only with --init busybox)
#   --shell    a shell on the console; leaving it reboots the VM (default with --init busybox
#              when there is no --command)
#   --command  run this, then reboot (the VM exits 0)
#   --add      copy a host file into the image (e.g. --add target/x:/usr/bin/x), repeatable
# Guest network: pass `dormouse.ip=ADDR/PREFIX[,GATEWAY]` on the kernel command line and the boot
# script configures eth0 (see deploy/net.sh for the host side).
# Says where the image went on stderr, and prints its absolute path as its last line.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/dormouse"
out=""
size=64
command=""
init=agent
agent=""
with_agent=1
shell=""
adds=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --command) command=$2; shift 2 ;;
        --init) init=$2; shift 2 ;;
        --agent) agent=$2; shift 2 ;;
        --no-agent) with_agent=0; shift ;;
        --shell) shell=1; shift ;;
        --add) adds+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        *) echo "build-rootfs.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
case "$size" in ''|*[!0-9]*) echo "build-rootfs.sh: --size takes MiB, got '$size'" >&2; exit 2 ;; esac
case "$init" in
    agent) [ "$with_agent" = 1 ] || { echo "build-rootfs.sh: --init agent needs the agent (drop --no-agent)" >&2; exit 2; } ;;
    busybox) ;;
    *) echo "build-rootfs.sh: --init takes agent or busybox, got '$init'" >&2; exit 2 ;;
esac
[ -n "$command" ] && [ "$shell" = 1 ] && { echo "build-rootfs.sh: --command and --shell exclude each other" >&2; exit 2; }
# The busybox init has always given a shell when there is nothing to run.
[ -z "$shell" ] && { [ "$init" = busybox ] && [ -z "$command" ] && shell=1 || shell=0; }

if [ "$with_agent" = 1 ] && [ -z "$agent" ]; then
    # Static, for any guest userland; its own --target keeps RUSTFLAGS off build scripts. Keyed
    # by what the binary is made of, so two checkouts (or two states of one) never swap agents.
    triple=x86_64-unknown-linux-gnu
    agent_key=$( (cd "$root" && find agent/guest agent/proto -type f \
            \( -name '*.rs' -o -name '*.toml' -o -name '*.proto' \) -not -path '*/target/*' \
            | LC_ALL=C sort | xargs cat; cat Cargo.lock Cargo.toml "$0"; rustc --version 2>/dev/null) \
        | sha256sum | cut -c1-16)
    # One cargo target directory for incremental builds; the binary is copied to its keyed
    # directory under a lock, so a concurrent run with other sources cannot swap it.
    target_dir="$cache_root/agent-target"
    agent_dir="$cache_root/agent-$agent_key"
    agent="$agent_dir/dormouse-agent"
    if [ ! -s "$agent" ]; then
        mkdir -p "$cache_root"
        echo "build-rootfs.sh: building the static guest agent into $agent_dir" >&2
        (
            flock 9
            cd "$root"
            RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target_dir" \
                cargo build --release --locked -q -p agent --bin dormouse-agent --target "$triple" >&2
            mkdir -p "$agent_dir"
            cp "$target_dir/$triple/release/dormouse-agent" "$agent.tmp.$$"
            mv "$agent.tmp.$$" "$agent"
        ) 9>"$cache_root/agent-target.lock"
    fi
fi
if [ "$with_agent" = 1 ]; then
    [ -f "$agent" ] || { echo "build-rootfs.sh: agent binary $agent not found" >&2; exit 2; }
    if ! file "$agent" 2>/dev/null | grep -Eq "statically linked|static-pie"; then
        command -v file >/dev/null 2>&1 && echo "build-rootfs.sh: warning: $agent does not look static" >&2
    fi
fi

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

# What runs once the system is up: the command, a console shell, or (agent init) nothing.
if [ -n "$command" ]; then
    job="$command
sync
reboot -f"
elif [ "$shell" = 1 ]; then
    job='echo "dormouse rootfs: shell on the console (exit reboots the VM; Ctrl-A x ends it from the host)"
setsid cttyhack sh -l
sync
reboot -f'
else
    job=""
fi
# eth0 from dormouse.ip=ADDR/PREFIX[,GATEWAY], with shell builtins only (a fork costs ~0.5 s in
# an emulated guest kernel).
network='read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        dormouse.ip=*)
            spec=${arg#dormouse.ip=}
            addr=${spec%%,*}
            gw=""
            [ "$spec" != "$addr" ] && gw=${spec#*,}
            ip link set lo up
            ip addr add "$addr" dev eth0 && ip link set eth0 up
            [ -n "$gw" ] && ip route add default via "$gw"
            ;;
    esac
done'

if [ "$with_agent" = 1 ]; then
    mkdir -p "$stage/usr/bin"
    cp "$agent" "$stage/usr/bin/dormouse-agent"
    chmod 755 "$stage/usr/bin/dormouse-agent"
fi

if [ "$init" = agent ]; then
    ln -s /usr/bin/dormouse-agent "$stage/sbin/init"
    mkdir -p "$stage/etc/dormouse"
    cat >"$stage/etc/dormouse/rc" <<RC
#!/bin/sh
# dormouse boot script, started by the agent (PID 1) once it listens.
$network
$job
RC
    chmod 755 "$stage/etc/dormouse/rc"
else
    agent_part=""
    [ "$with_agent" = 1 ] && agent_part="/usr/bin/dormouse-agent &"
    cat >"$stage/sbin/init" <<INIT
#!/bin/sh
# dormouse rootfs init (busybox): essentials, network from dormouse.ip=, the agent, then the job.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
hostname -F /etc/hostname
$network
$agent_part
${job:-"while :; do sleep 3600; done"}
INIT
    chmod 755 "$stage/sbin/init"
fi

for spec in "${adds[@]}"; do
    src=${spec%%:*}
    dest=${spec#*:}
    mkdir -p "$stage/$(dirname "$dest")"
    cp "$src" "$stage/$dest"
done

if [ -z "$out" ]; then
    # Everything that makes the image: the staged tree (agent, scripts, added files, options)
    # and the image size.
    image_key=$( (cd "$stage" && find . -print0 | LC_ALL=C sort -z \
            | xargs -0 stat -c '%n %a %F' ; find . -type f -print0 | LC_ALL=C sort -z \
            | xargs -0 cat; find . -type l -print0 | LC_ALL=C sort -z | xargs -0 -r readlink; \
            echo "size=$size") | sha256sum | cut -c1-16)
    out="$cache_root/rootfs-$image_key.ext4"
fi
mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
rm -f "$tmp"
mkfs.ext4 -q -F -L dormouse-root -d "$stage" -E root_owner=0:0 "$tmp" "${size}M" >&2
mv "$tmp" "$out"
echo "build-rootfs.sh: image at $(readlink -f "$out")" >&2
readlink -f "$out"
