//! Which guest frames belong to the MMDS: ARP packets asking for (or answering) its address and
//! IPv4 packets to it. Anything else, VLAN-tagged frames included, goes to the TAP unchanged.

use std::net::Ipv4Addr;

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];
/// The target protocol address in an Ethernet/IPv4 ARP packet.
const ARP_TPA: std::ops::Range<usize> = ETH_HEADER + 24..ETH_HEADER + 28;
/// The destination address in an IPv4 header.
const IPV4_DST: std::ops::Range<usize> = ETH_HEADER + 16..ETH_HEADER + 20;

/// Whether the Ethernet frame `frame` (no virtio-net header) is for the MMDS at `ip`.
pub fn is_for_mmds(frame: &[u8], ip: Ipv4Addr) -> bool {
    let target = match frame.get(12..14) {
        Some(t) if t == ETHERTYPE_ARP => frame.get(ARP_TPA),
        Some(t) if t == ETHERTYPE_IPV4 => frame.get(IPV4_DST),
        _ => None,
    };
    target == Some(&ip.octets()[..])
}
