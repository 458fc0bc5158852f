#!/usr/bin/env bash
# Builds an ext4 root filesystem image for dormouse guests. By default: busybox-static and the
# dormouse guest agent (static), which runs as init. With --from: a real distribution (Debian via
# mmdebstrap) or an OCI / `docker save` image, with the agent added as init. Made with
# `mkfs.ext4 -d` from a staging directory: no loop mounts (--from needs root, for ownership).
#
# Usage: deploy/build-rootfs.sh [--out FILE] [--size MIB] [--init agent|busybox] [--agent PATH]
#                               [--no-agent] [--shell] [--command "SHELL COMMAND"] [--add SRC:DEST]...
#                               [--from debian[:SUITE] [--packages P1,P2...] | --from oci:PATH[:TAG]]
#   --init     agent (default): /sbin/init is a symlink to the agent, /usr/bin/dormouse-agent
#              (PID 1: mounts, hostname, lo, eth0 from dormouse.ip=, /etc/resolv.conf from
#              dormouse.dns=, reaping, gRPC on vsock port 1024, readiness on host port 1023); it
#              starts /etc/dormouse/rc, which runs --command or --shell, if given.
#              busybox: a shell-script init that also configures eth0 (the agent, when included,
#              runs in the background). Not with --from.
#   --from     debian[:SUITE] (SUITE default bookworm): `mmdebstrap --variant=minbase` plus bash,
#              coreutils, procps, iproute2, iputils-ping, ca-certificates and --packages, from the
#              Debian archive(s) the host's apt sources name (else http://deb.debian.org/debian),
#              through the host's apt proxy settings. The mmdebstrap tarball is cached, keyed by
#              suite, packages, mirrors and the script text that makes it:
#              ${XDG_CACHE_HOME:-~/.cache}/dormouse/debian-<hash>.tar
#              oci:PATH[:TAG]: an OCI image layout directory (TAG picks one of several tags) or a
#              `docker save` .tar archive; its layers are unpacked in order (whiteouts honoured)
#              and its config's Env, WorkingDir and User become the agent's exec defaults,
#              /etc/dormouse/exec-defaults: lines `env KEY=VALUE`, `cwd /path`,
#              `user NAME_OR_UID[:GROUP_OR_GID]`, `#` comments (a value with a newline is refused).
#              Both get /etc/hostname, /etc/hosts and an empty /etc/resolv.conf; an image's own
#              /sbin/init is replaced by the agent (said on stderr).
#   --packages comma-separated extra Debian packages (only with --from debian)
#   --out      where the image goes; default: a file in the cache keyed by every input (the agent
#              binary, the options, the added files, this script; with --from also the base tree),
#              so runs with different inputs never overwrite each other's image, and a --from
#              image already there is reused: ${XDG_CACHE_HOME:-~/.cache}/dormouse/rootfs-<hash>.ext4
#   --size     image size in MiB; default 64, with --from the tree's size plus half again, at
#              least 256 MiB free, rounded up to 64 MiB (a --size too small for the tree is an error)
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
# Guest network: pass `dormouse.ip=ADDR/PREFIX[,GATEWAY]` (and `dormouse.dns=IP[,IP]`) on the
# kernel command line (see deploy/net.sh for the host side).
# Says where the image went on stderr, and prints its absolute path as its last line.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/dormouse"
out=""
size=""
command=""
init=agent
agent=""
with_agent=1
shell=""
adds=()
from=""
packages=""
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
        --from) from=$2; shift 2 ;;
        --packages) packages=$2; shift 2 ;;
        -h|--help) sed -n '2,48p' "$0"; exit 0 ;;
        *) echo "build-rootfs.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
die() { echo "build-rootfs.sh: $*" >&2; exit 2; }
case "$size" in ''|*[!0-9]*) [ -z "$size" ] || die "--size takes MiB, got '$size'" ;; esac
case "$init" in
    agent) [ "$with_agent" = 1 ] || die "--init agent needs the agent (drop --no-agent)" ;;
    busybox) ;;
    *) die "--init takes agent or busybox, got '$init'" ;;
esac
[ -n "$command" ] && [ "$shell" = 1 ] && die "--command and --shell exclude each other"
from_kind="" suite="" oci_path="" oci_tag=""
case "$from" in
    "") [ -z "$packages" ] || die "--packages needs --from debian" ;;
    debian) from_kind=debian suite=bookworm ;;
    debian:*) from_kind=debian suite=${from#debian:} ;;
    oci:*)
        from_kind=oci oci_path=${from#oci:}
        # PATH[:TAG]: the whole spec when it names something, else the shortest PATH before a
        # colon that does (a docker archive's TAG may hold colons itself: repo:tag).
        if [ ! -e "$oci_path" ]; then
            rest=$oci_path prefix=""
            while [[ "$rest" == *:* ]]; do
                prefix+=${rest%%:*} rest=${rest#*:}
                if [ -e "$prefix" ]; then oci_path=$prefix oci_tag=$rest; break; fi
                prefix+=:
            done
        fi
        [ -e "$oci_path" ] || die "--from oci: no such layout directory or archive: $oci_path"
        ;;
    *) die "--from takes debian[:SUITE] or oci:PATH[:TAG], got '$from'" ;;
esac
if [ -n "$from_kind" ]; then
    [ "$init" = agent ] || die "--from images boot the agent as init: --init busybox is not supported with --from"
    [ "$(id -u)" = 0 ] || die "--from needs root (the image keeps the tree's owners)"
    [[ "$suite" =~ ^[a-z0-9][a-z0-9.-]*$ ]] || [ "$from_kind" = oci ] || die "bad Debian suite '$suite'"
    [ -z "$packages" ] || [ "$from_kind" = debian ] || die "--packages is only for --from debian"
fi
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
    if ! grep -Eq "statically linked|static-pie" <<<"$(file "$agent" 2>/dev/null)"; then
        command -v file >/dev/null 2>&1 && echo "build-rootfs.sh: warning: $agent does not look static" >&2
    fi
fi

need=()
if [ -z "$from_kind" ]; then
    dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
fi
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
if [ "$from_kind" = debian ]; then
    command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
    [ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
fi
if [ "$from_kind" = oci ]; then
    command -v umoci >/dev/null 2>&1 || need+=(umoci)
    command -v jq >/dev/null 2>&1 || need+=(jq)
    [ -d "$oci_path" ] || command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
fi
if [ "${#need[@]}" -gt 0 ]; then
    echo "build-rootfs.sh: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${need[@]}" >&2 || { apt-get update -qq >&2 && apt-get install -y -qq "${need[@]}" >&2; }
fi

if [ -n "$from_kind" ]; then
    # ---------------------------------------------------------------- real guest images (--from)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT

    # The Debian archive URIs the host's apt uses (one-line .list and deb822 .sources files): the
    # entries for the suite itself or a plain release name, not -security/-updates or third-party
    # repositories.
    host_debian_mirrors() {
        local sourcelist="" sourceparts="" files=() f codename=""
        eval "$(apt-config shell sourcelist Dir::Etc::sourcelist/f sourceparts Dir::Etc::sourceparts/d 2>/dev/null)"
        [ -f "${sourcelist:-/etc/apt/sources.list}" ] && files+=("${sourcelist:-/etc/apt/sources.list}")
        for f in "${sourceparts:-/etc/apt/sources.list.d}"/*.list "${sourceparts:-/etc/apt/sources.list.d}"/*.sources; do
            [ -f "$f" ] && files+=("$f")
        done
        # shellcheck disable=SC1091
        [ -r /etc/os-release ] && codename=$(. /etc/os-release && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}")
        [ "${#files[@]}" -gt 0 ] || return 0
        awk -v want="$suite $codename stable testing unstable sid oldstable" '
            function emit(uri, suite) {
                if (index(" " want " ", " " suite " ") && !(uri in seen)) { seen[uri] = 1; print uri }
            }
            function flush(   i, j, nu, ns, us, ss) {
                if (types ~ /(^| )deb( |$)/ && enabled !~ /^(no|false)$/) {
                    nu = split(uris, us, " "); ns = split(suites, ss, " ")
                    for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++) emit(us[i], ss[j])
                }
                types = uris = suites = enabled = ""
            }
            FNR == 1 { flush(); deb822 = (FILENAME ~ /\.sources$/) }
            { sub(/#.*/, "") }
            !deb822 {
                if ($1 != "deb") next
                i = 2
                if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                emit($i, $(i + 1)); next
            }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:" { $1 = ""; types = $0 }
            tolower($1) == "uris:" { $1 = ""; uris = $0 }
            tolower($1) == "suites:" { $1 = ""; suites = $0 }
            tolower($1) == "enabled:" { enabled = tolower($2) }
            END { flush() }' "${files[@]}"
    }

    # The minimal Debian tree as a tarball, made once per suite, package list and mirror set.
    debian_base() {  # debian_base OUT.tar
        local include=bash,coreutils,procps,iproute2,iputils-ping,ca-certificates
        [ -z "$packages" ] || include="$include,$packages"
        local sources=() m hooks=()
        for m in "${mirrors[@]}"; do sources+=("deb $m $suite main"); done
        # The host's proxies serve this build only: mmdebstrap would keep its --aptopt in the tree.
        # shellcheck disable=SC2016 # expanded by mmdebstrap's hook shell
        [ "${#aptopts[@]}" -eq 0 ] || hooks=(--customize-hook='rm -f "$1/etc/apt/apt.conf.d/99mmdebstrap"')
        nice -n 10 mmdebstrap --quiet --variant=minbase --format=tar --include="$include" \
            "${aptopts[@]}" "${hooks[@]}" "$suite" "$1" "${sources[@]}" >&2
    }

    if [ "$from_kind" = debian ]; then
        case "$packages" in *[!a-z0-9+.,-]*) die "--packages takes comma-separated Debian package names, got '$packages'" ;; esac
        packages=$(tr ',' '\n' <<<"$packages" | sed '/^$/d' | LC_ALL=C sort -u | paste -sd, -)
        mapfile -t mirrors < <(host_debian_mirrors)
        [ "${#mirrors[@]}" -gt 0 ] || mirrors=(http://deb.debian.org/debian)
        # The host's apt proxies (Acquire::http::Proxy "…"; and the like), for mmdebstrap's apt.
        aptopts=()
        while IFS= read -r line; do
            aptopts+=("--aptopt=$line")
        done < <(apt-config dump 2>/dev/null | grep -E '^Acquire::[^ ]+::Proxy(::[^ ]+)? ' || true)
        base_key=$( { echo "suite=$suite packages=$packages"; printf 'mirror=%s\n' "${mirrors[@]}"
            declare -f debian_base; } | sha256sum | cut -c1-16)
        base="$cache_root/debian-$base_key.tar"
        mkdir -p "$cache_root"
        if [ ! -s "$base" ]; then
            (
                flock 9
                if [ ! -s "$base" ]; then
                    echo "build-rootfs.sh: mmdebstrap $suite from ${mirrors[*]} into $base" >&2
                    rm -f "$base.tmp.$$"
                    debian_base "$base.tmp.$$" || { rm -f "$base.tmp.$$"; die "mmdebstrap failed"; }
                    mv "$base.tmp.$$" "$base"
                fi
            ) 9>"$base.lock"
        fi
        source_key="debian $base_key"
    else
        # An OCI layout (index.json -> manifest -> config), or a `docker save` archive that skopeo
        # turns into one.
        if [ -f "$oci_path" ]; then
            source_key="docker-archive $(sha256sum <"$oci_path" | cut -c1-64) tag=$oci_tag"
        else
            if [ ! -f "$oci_path/oci-layout" ] || [ ! -f "$oci_path/index.json" ]; then
                die "$oci_path is not an OCI image layout (no oci-layout / index.json)"
            fi
            tags=$(jq -r '.manifests[]?.annotations["org.opencontainers.image.ref.name"] // empty' "$oci_path/index.json")
            tag_list=$(paste -sd' ' - <<<"$tags")
            if [ -z "$oci_tag" ]; then
                [ "$(jq '.manifests | length' "$oci_path/index.json")" = 1 ] \
                    || die "$oci_path holds several images (tags: $tag_list): pick one with --from oci:$oci_path:TAG"
                oci_tag=$tags
                [ -n "$oci_tag" ] || die "$oci_path: its only image has no tag (org.opencontainers.image.ref.name)"
            fi
            grep -qxF -- "$oci_tag" <<<"$tags" || die "$oci_path has no tag '$oci_tag' (tags: $tag_list)"
            manifest_digest=$(jq -r --arg t "$oci_tag" \
                '[.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t)][0].digest' \
                "$oci_path/index.json")
            # The manifest's digest names the config and every layer by their digests.
            source_key="oci $manifest_digest"
        fi
    fi

    job=""
    if [ -n "$command" ]; then
        job="$command
sync
kill -TERM 1"
    elif [ "$shell" = 1 ]; then
        # shellcheck disable=SC2016 # expanded in the guest
        # The console's real tty, so the shell gets job control; leaving it reboots (SIGTERM to
        # the agent, PID 1).
        job='echo "dormouse rootfs: shell on the console (exit reboots the VM; Ctrl-A x ends it from the host)"
con=console
[ -r /sys/class/tty/console/active ] && read -r con </sys/class/tty/console/active && con=${con##* }
setsid -c sh -l <>"/dev/$con" >&0 2>&0
sync
kill -TERM 1'
    fi

    add_key=""
    for spec in "${adds[@]}"; do
        [ -f "${spec%%:*}" ] || die "--add: no such file ${spec%%:*}"
        add_key+="$spec $(sha256sum <"${spec%%:*}")"$'\n'
    done
    if [ -z "$out" ]; then
        image_key=$( { echo "$source_key"; sha256sum <"$agent"; printf 'job=%s\nsize=%s\n' "$job" "$size"
            printf '%s' "$add_key"; cat "$0"; } | sha256sum | cut -c1-16)
        out="$cache_root/rootfs-$image_key.ext4"
        # Reused only while it is as made: the stamp holds its size and mtime at creation, so an
        # image someone booted writable (`dormouse run --rootfs` on the cached file) is rebuilt.
        if [ -s "$out" ] && [ -f "$out.stamp" ] && [ "$(stat -c '%s %.9Y' "$out")" = "$(cat "$out.stamp")" ]; then
            echo "build-rootfs.sh: image at $(readlink -f "$out") (cached)" >&2
            readlink -f "$out"
            exit 0
        fi
    fi

    stage="$work/rootfs"
    exec_defaults=""
    if [ "$from_kind" = debian ]; then
        mkdir "$stage"
        tar -C "$stage" --numeric-owner --xattrs --xattrs-include='*' -xpf "$base"
    else
        layout="$oci_path"
        if [ -f "$oci_path" ]; then
            # TAG, if given, names the image in the archive (`docker save` writes repo:tag names).
            layout="$work/layout" ref="docker-archive:$oci_path${oci_tag:+:$oci_tag}" oci_tag=img
            skopeo copy --quiet "$ref" "oci:$layout:$oci_tag" >&2 || die "skopeo cannot copy $ref (not a docker save archive, or no such image in it)"
        fi
        manifest=$(jq -r --arg t "$oci_tag" \
            '[.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t)][0].digest' \
            "$layout/index.json")
        blob() { local d=$1; printf '%s/blobs/%s/%s' "$layout" "${d%%:*}" "${d#*:}"; }
        [ -f "$(blob "$manifest")" ] || die "$oci_path: manifest $manifest not found (a multi-platform index is not supported)"
        config=$(blob "$(jq -r '.config.digest' "$(blob "$manifest")")")
        [ -f "$config" ] || die "$oci_path: image config blob missing"
        # Env, WorkingDir, User -> exec defaults; one value per line, so no value may hold one.
        bad=$(jq -r '.config // {} | [(.Env // [])[], .WorkingDir // "", .User // ""][] | select(test("\n"))' "$config" | head -c 200)
        [ -z "$bad" ] || die "$oci_path: an image config value holds a newline, which exec-defaults cannot express: ${bad%%$'\n'*}..."
        bad=$(jq -r '(.config.Env // [])[] | select(test("^[^=]+=") | not)' "$config")
        [ -z "$bad" ] || die "$oci_path: image config Env entry '$bad' is not KEY=VALUE"
        bad=$(jq -r '.config // {} | [(.Env // [])[], .WorkingDir // "", .User // ""][] | select(test("\r$"))' "$config")
        [ -z "$bad" ] || die "$oci_path: an image config value ends in a carriage return, which exec-defaults drops"
        bad=$(jq -r '.config.WorkingDir // "" | select(. != "" and (startswith("/") | not))' "$config")
        [ -z "$bad" ] || die "$oci_path: image config WorkingDir '$bad' is not an absolute path"
        bad=$(jq -r '.config.User // "" | select(test(" "))' "$config")
        [ -z "$bad" ] || die "$oci_path: image config User '$bad' holds a space"
        exec_defaults="# dormouse-agent exec defaults, from the OCI image config (Env, WorkingDir, User)
# (lines: env KEY=VALUE, cwd /path, user NAME_OR_UID[:GROUP_OR_GID]; # comments)
$(jq -r '.config // {} | ((.Env // [])[] | "env " + .),
    (select((.WorkingDir // "") != "") | "cwd " + .WorkingDir),
    (select((.User // "") != "") | "user " + .User)' "$config")"
        umoci unpack --image "$layout:$oci_tag" "$work/bundle" >&2 || die "umoci cannot unpack $oci_path:$oci_tag"
        mv "$work/bundle/rootfs" "$stage"
    fi

    # A path inside the tree: symlinks in it resolve as if the tree were /, never out to the host.
    in_tree() {
        local rest=${1#/} done="" comp target hops=0
        while [ -n "$rest" ]; do
            comp=${rest%%/*}
            if [ "$comp" = "$rest" ]; then rest=""; else rest=${rest#*/}; fi
            case "$comp" in
                ''|.) continue ;;
                ..) done=${done%/*}; continue ;;
            esac
            if [ -L "$stage$done/$comp" ]; then
                hops=$((hops + 1))
                [ "$hops" -le 40 ] || die "too many symlinks in the image resolving $1"
                target=$(readlink "$stage$done/$comp")
                case "$target" in /*) done="" ;; esac
                rest="${target#/}${rest:+/$rest}"
            else
                done="$done/$comp"
            fi
        done
        printf '%s\n' "$stage$done"
    }
    # Where to write PATH: its directory resolved (and made), the name itself not followed.
    tree_file() {
        local dir
        dir=$(in_tree "$(dirname "$1")")
        mkdir -p "$dir"
        rm -f "$dir/$(basename "$1")"
        printf '%s/%s\n' "$dir" "$(basename "$1")"
    }

    for d in proc sys dev run tmp; do
        [ -e "$(in_tree "/$d")" ] || { mkdir -p "$(in_tree "/$d")"; [ "$d" != tmp ] || chmod 1777 "$(in_tree /tmp)"; }
    done
    f=$(tree_file /usr/bin/dormouse-agent)
    cp "$agent" "$f"
    chmod 755 "$f"
    init_path=$(in_tree /sbin)/init
    if [ -e "$init_path" ] || [ -L "$init_path" ]; then
        [ "$(readlink "$init_path" 2>/dev/null)" = /usr/bin/dormouse-agent ] \
            || echo "build-rootfs.sh: the image has its own /sbin/init ($(readlink "$init_path" 2>/dev/null || echo file)); replacing it with the dormouse agent" >&2
    fi
    ln -s /usr/bin/dormouse-agent "$(tree_file /sbin/init)"
    echo dormouse >"$(tree_file /etc/hostname)"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tdormouse\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$(tree_file /etc/hosts)"
    # Empty, not the host's: the agent writes it from dormouse.dns=.
    : >"$(tree_file /etc/resolv.conf)"
    if [ -n "$exec_defaults" ]; then
        f=$(tree_file /etc/dormouse/exec-defaults)
        printf '%s\n' "$exec_defaults" >"$f"
        chmod 644 "$f"
    fi
    if [ -n "$job" ]; then
        [ -x "$(in_tree /bin/sh)" ] || die "$from has no /bin/sh for --command/--shell"
        f=$(tree_file /etc/dormouse/rc)
        printf '#!/bin/sh\n# dormouse boot script, started by the agent (PID 1) once it listens; the agent\n# has configured the network already.\n%s\n' "$job" >"$f"
        chmod 755 "$f"
    fi
    for spec in "${adds[@]}"; do
        cp "${spec%%:*}" "$(tree_file "${spec#*:}")"
    done

    # Size: the tree (disk usage) plus half again, at least 256 MiB free, in 64 MiB steps.
    used=$(du -s -x --block-size=1M "$stage" | cut -f1)
    nfiles=$(find "$stage" -xdev | wc -l)
    min=$((used + used / 8 + 32 + nfiles / 64))
    if [ -z "$size" ]; then
        size=$((used + used / 2))
        [ "$size" -ge $((used + 256)) ] || size=$((used + 256))
        size=$(( (size + 63) / 64 * 64 ))
    elif [ "$size" -lt "$min" ]; then
        die "--size $size MiB is too small for this tree ($used MiB in $nfiles files): use at least $min MiB, or leave --size out"
    fi
    # Enough inodes for many small files (the default is one per 16 KiB).
    inodes=()
    [ $((nfiles + nfiles / 4 + 1024)) -le $((size * 64)) ] || inodes=(-N $((nfiles + nfiles / 4 + 1024)))
    mkdir -p "$(dirname "$out")"
    tmp="$out.tmp.$$"
    rm -f "$tmp"
    mkfs.ext4 -q -F -L dormouse-root "${inodes[@]}" -d "$stage" -E root_owner=0:0 "$tmp" "${size}M" >&2 \
        || { rm -f "$tmp"; die "mkfs.ext4 failed making a $size MiB image of a $used MiB tree (is --size too small?)"; }
    mv "$tmp" "$out"
    stat -c '%s %.9Y' "$out" >"$out.stamp"
    echo "build-rootfs.sh: image at $(readlink -f "$out") ($size MiB, $used MiB used)" >&2
    readlink -f "$out"
    exit 0
fi

# ------------------------------------------------------------------------ busybox images
size=${size:-64}
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
# The busybox init's eth0 from dormouse.ip=ADDR/PREFIX[,GATEWAY], with shell builtins only (a fork costs ~0.5 s in
# an emulated guest kernel).
# shellcheck disable=SC2016 # expanded in the guest
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
    # The agent itself configures the network (dormouse.ip=, dormouse.dns=).
    cat >"$stage/etc/dormouse/rc" <<RC
#!/bin/sh
# dormouse boot script, started by the agent (PID 1) once it listens; the agent has configured
# the network already.
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
