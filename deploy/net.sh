#!/usr/bin/env bash
# Host side of a guest's network: a TAP device with the host's address, and NAT so the guest
# reaches whatever the host reaches (MASQUERADE), with optional port forwards (DNAT) into the guest.
#
#   deploy/net.sh up TAP [--host-ip 172.30.0.1/30] [--guest-ip 172.30.0.2] [--forward HOSTPORT:GUESTPORT]...
#                        [--dns IP[,IP]]
#   deploy/net.sh down TAP
#
# Guest side: boot with `--cmdline "... dormouse.ip=172.30.0.2/30,172.30.0.1 dormouse.dns=IP"`: the
# agent as init (or the busybox init script) configures eth0, and the agent writes the guest's
# /etc/resolv.conf from dormouse.dns= (or run `ip addr add` / `ip route add default via` yourself).
# --dns only goes into the boot line `up` suggests (default: no dormouse.dns=); it sets up nothing.
# Rules are tagged with a comment naming the TAP so `down` removes exactly what `up` added.
set -euo pipefail

usage() { sed -n '2,13p' "$0"; exit 2; }
[ $# -ge 2 ] || usage
action=$1 tap=$2
shift 2
host_ip=172.30.0.1/30
guest_ip=172.30.0.2
forwards=()
dns=""
while [ $# -gt 0 ]; do
    case "$1" in
        --host-ip) host_ip=$2; shift 2 ;;
        --guest-ip) guest_ip=$2; shift 2 ;;
        --forward) forwards+=("$2"); shift 2 ;;
        --dns) dns=$2; shift 2 ;;
        *) usage ;;
    esac
done
tag="dormouse:$tap"
subnet=$(python3 -c "import ipaddress,sys; print(ipaddress.ip_interface(sys.argv[1]).network)" "$host_ip")

case "$action" in
    up)
        ip link show "$tap" >/dev/null 2>&1 || ip tuntap add dev "$tap" mode tap vnet_hdr
        ip addr replace "$host_ip" dev "$tap"
        ip link set "$tap" up
        sysctl -qw net.ipv4.ip_forward=1
        iptables -t nat -A POSTROUTING -s "$subnet" ! -o "$tap" -j MASQUERADE -m comment --comment "$tag"
        iptables -A FORWARD -i "$tap" -j ACCEPT -m comment --comment "$tag"
        iptables -A FORWARD -o "$tap" -m state --state RELATED,ESTABLISHED -j ACCEPT -m comment --comment "$tag"
        for f in "${forwards[@]}"; do
            iptables -t nat -A PREROUTING -p tcp --dport "${f%%:*}" -j DNAT \
                --to-destination "$guest_ip:${f#*:}" -m comment --comment "$tag"
            iptables -A FORWARD -o "$tap" -p tcp -d "$guest_ip" --dport "${f#*:}" -j ACCEPT -m comment --comment "$tag"
        done
        boot="dormouse.ip=$guest_ip/${host_ip#*/},${host_ip%/*}${dns:+ dormouse.dns=$dns}"
        echo "net.sh: $tap up: host $host_ip, guest $guest_ip (boot with $boot)" >&2
        ;;
    down)
        for table in nat filter; do
            iptables -t "$table" -S | grep -F -- "--comment \"$tag\"" | sed 's/^-A/-D/' | while read -r rule; do
                eval iptables -t "$table" "$rule"
            done
        done
        ip link del "$tap" 2>/dev/null || true
        echo "net.sh: $tap down" >&2
        ;;
    *) usage ;;
esac
