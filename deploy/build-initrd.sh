#!/usr/bin/env bash
# Builds a small uncompressed initrd (busybox-static) whose /init runs a command and reboots the
# VM (dormouse then exits 0). Uncompressed on purpose: on an emulating PVM host the guest kernel
# unpacks about 1 MB/s, and a decompressor would be slower still.
#
# Usage: deploy/build-initrd.sh [--out FILE] [--command "SHELL COMMAND"] [--init FILE] [--shell]
#                                [--agent PATH] [--add SRC:DEST]...
#   --command  what /init runs after mounting /proc, /sys, /dev (default: print a banner)
#   --init     use this file as /init instead of the generated one
#   --shell    start an interactive shell on the console instead of rebooting
#   --agent    the static dormouse-agent becomes /init (PID 1: mounts, gRPC on vsock port 1024,
#              readiness to host port 1023); --command/--shell then go to /etc/dormouse/rc, which
#              the agent starts once it listens (no --command: nothing else runs). With --init,
#              the agent is put at /bin/dormouse-agent instead.
#   --add      put a host file into the initrd (e.g. --add target/x:/bin/x), repeatable;
#              missing parent directories are created
# Prints the initrd's absolute path as its last line.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=""
command='echo "dormouse initrd: hello from $(uname -sr)"'
init_file=""
shell=0
agent=""
command_given=0
adds=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --command) command=$2; command_given=1; shift 2 ;;
        --init) init_file=$2; shift 2 ;;
        --shell) shell=1; shift ;;
        --agent) agent=$2; shift 2 ;;
        --add) adds+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "build-initrd.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

busybox=/bin/busybox
if [ ! -x "$busybox" ] || ! grep -q "statically linked" <<<"$(file "$busybox" 2>/dev/null)"; then
    if ! dpkg -s busybox-static >/dev/null 2>&1; then
        echo "build-initrd.sh: installing busybox-static" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >&2 \
            || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >&2; }
    fi
    busybox=$(dpkg -L busybox-static | grep -E '/bin/busybox$' | head -n1)
fi
command -v python3 >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >&2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -z "$out" ]; then
    mkdir -p "${XDG_CACHE_HOME:-$HOME/.cache}/dormouse"
    out="${XDG_CACHE_HOME:-$HOME/.cache}/dormouse/initrd.cpio"
fi

if [ -n "$agent" ]; then
    [ -f "$agent" ] || { echo "build-initrd.sh: --agent: $agent is not a file" >&2; exit 2; }
fi
rc=""
if [ -n "$init_file" ]; then
    cp "$init_file" "$work/init"
elif [ -n "$agent" ]; then
    # The agent is /init and mounts everything itself; the job (if any) is its boot script.
    cp "$agent" "$work/init"
    if [ "$command_given" = 1 ] || [ "$shell" = 1 ]; then
        job="$command"
        [ "$command_given" = 1 ] || job=""
        if [ "$shell" = 1 ]; then
            job="$job
echo \"dormouse initrd: shell (exit or Ctrl-D reboots the VM)\"; setsid cttyhack sh"
        fi
        rc="$work/rc"
        printf '#!/bin/sh\n%s\nsync\nreboot -f\n' "$job" >"$rc"
    fi
else
    if [ "$shell" = 1 ]; then
        finish='echo "dormouse initrd: shell (exit or Ctrl-D reboots the VM)"; setsid cttyhack sh; reboot -f'
    else
        finish='reboot -f'
    fi
    cat >"$work/init" <<INIT
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
$command
$finish
INIT
fi

cat >"$work/list" <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /tmp 1777 0 0
dir /bin 0755 0 0
dir /sbin 0755 0 0
file /bin/busybox $busybox 0755 0 0
file /init $work/init 0755 0 0
LIST
if [ -n "$rc" ]; then
    printf 'dir /etc 0755 0 0\ndir /etc/dormouse 0755 0 0\nfile /etc/dormouse/rc %s 0755 0 0\n' "$rc" >>"$work/list"
fi
if [ -n "$agent" ] && [ -n "$init_file" ]; then
    echo "file /bin/dormouse-agent $(readlink -f "$agent") 0755 0 0" >>"$work/list"
fi
for applet in sh mount echo ls cat true dd reboot poweroff sleep uname date mkdir nproc grep \
        setsid cttyhack sync rm cp mv ps kill head tail wc sha256sum ip ping nc ifconfig seq env \
        chmod id printf; do
    echo "slink /bin/$applet busybox 0777 0 0" >>"$work/list"
done
declare -A have_dir=([/dev]=1 [/proc]=1 [/sys]=1 [/tmp]=1 [/bin]=1 [/sbin]=1)
[ -n "$rc" ] && have_dir[/etc]=1 && have_dir[/etc/dormouse]=1
for spec in "${adds[@]}"; do
    src=${spec%%:*}
    dest=${spec#*:}
    if [ "$src" = "$spec" ] || [ -z "$src" ] || [ "${dest#/}" = "$dest" ] || [ "$dest" = / ]; then
        echo "build-initrd.sh: --add takes SRC:/ABSOLUTE/DEST, got '$spec'" >&2; exit 2
    fi
    [ -f "$src" ] || { echo "build-initrd.sh: --add: $src is not a file" >&2; exit 2; }
    # Parents first, outermost first, each once.
    parents=()
    d=$(dirname "$dest")
    while [ "$d" != / ]; do parents=("$d" "${parents[@]}"); d=$(dirname "$d"); done
    for d in "${parents[@]}"; do
        [ -n "${have_dir[$d]:-}" ] && continue
        have_dir[$d]=1
        echo "dir $d 0755 0 0" >>"$work/list"
    done
    mode=0644
    [ -x "$src" ] && mode=0755
    echo "file $dest $(readlink -f "$src") $mode 0 0" >>"$work/list"
done
python3 "$here/mkcpio.py" "$work/list" "$out"
readlink -f "$out"
