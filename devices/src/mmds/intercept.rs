//! Which guest frames belong to the MMDS: ARP packets asking for (or answering) its address and
//! IPv4 packets to it. Anything else, VLAN-tagged frames included, goes to the TAP unchanged.

use std::net::Ipv4Addr;

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];
/// The target protocol address in an Ethernet/IPv4 ARP packet.
const ARP_TPA: std::ops::Range<usize> = ETH_HEADER + 24..ETH_HEADER + 28;
/// The source and destination addresses in an IPv4 header.
const IPV4_SRC: std::ops::Range<usize> = ETH_HEADER + 12..ETH_HEADER + 16;
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

/// Whether the MMDS may answer an IPv4 frame's sender. smoltcp accepts packets from 0.0.0.0
/// (for DHCP) and then asserts, panicking, when a TCP reply would go back to it; a broadcast
/// or multicast sender is no one to answer either. So an IPv4 packet whose source is not a
/// unicast address never reaches the stack. Frames that are not IPv4 pass: ARP is checked by
/// smoltcp itself, and anything else is not for the MMDS.
pub fn has_answerable_source(frame: &[u8]) -> bool {
    if frame.get(12..14) != Some(&ETHERTYPE_IPV4[..]) {
        return true;
    }
    let Some(&[a, b, c, d]) = frame.get(IPV4_SRC) else {
        return false;
    };
    let src = Ipv4Addr::new(a, b, c, d);
    !(src.is_unspecified() || src.is_broadcast() || src.is_multicast())
}
