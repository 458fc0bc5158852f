//! Ethernet/IPv4/UDP frames as a guest would put them on its TX queue (no offloads: the IPv4
//! header checksum is filled in, the optional UDP checksum is left 0).

use std::net::Ipv4Addr;

pub const ETH_HDR_LEN: usize = 14;
pub const IPV4_HDR_LEN: usize = 20;
pub const UDP_HDR_LEN: usize = 8;
/// Bytes of Ethernet + IPv4 + UDP headers in front of the payload.
pub const UDP_FRAME_OVERHEAD: usize = ETH_HDR_LEN + IPV4_HDR_LEN + UDP_HDR_LEN;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpEndpoint {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// An Ethernet frame (without FCS) carrying a UDP datagram of `payload_len` bytes of 0xab.
/// None if the datagram would not fit an IPv4 packet.
pub fn udp_frame(src: UdpEndpoint, dst: UdpEndpoint, payload_len: usize) -> Option<Vec<u8>> {
    let udp_len = u16::try_from(UDP_HDR_LEN.checked_add(payload_len)?).ok()?;
    let ip_len = udp_len.checked_add(IPV4_HDR_LEN as u16)?;
    let mut f = Vec::with_capacity(UDP_FRAME_OVERHEAD + payload_len);
    f.extend_from_slice(&dst.mac);
    f.extend_from_slice(&src.mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; IPV4_HDR_LEN];
    ip[0] = 0x45; // version 4, 5-word header
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&src.ip.octets());
    ip[16..20].copy_from_slice(&dst.ip.octets());
    let csum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src.port.to_be_bytes());
    f.extend_from_slice(&dst.port.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&0u16.to_be_bytes()); // no UDP checksum (allowed over IPv4)
    f.resize(UDP_FRAME_OVERHEAD + payload_len, 0xab);
    Some(f)
}

/// RFC 1071 one's-complement checksum of an IPv4 header whose checksum field is zero.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| {
            let hi = c.first().copied().unwrap_or(0);
            let lo = c.get(1).copied().unwrap_or(0);
            u32::from(u16::from_be_bytes([hi, lo]))
        })
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example() {
        // Header from the Wikipedia IPv4 checksum example; its checksum is 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(
            ipv4_checksum(&h),
            0,
            "a header with its checksum sums to zero"
        );
    }

    #[test]
    fn frame_layout() {
        let a = UdpEndpoint {
            mac: [2, 0, 0, 0, 0, 1],
            ip: Ipv4Addr::new(172, 30, 0, 1),
            port: 7,
        };
        let b = UdpEndpoint {
            mac: [2, 0, 0, 0, 0, 2],
            ip: Ipv4Addr::new(172, 30, 0, 2),
            port: 9,
        };
        let f = udp_frame(a, b, 18).unwrap();
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &b.mac);
        assert_eq!(&f[6..12], &a.mac);
        assert_eq!(ipv4_checksum(&f[14..34]), 0);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 46);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 9);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 26);
        assert!(udp_frame(a, b, 70_000).is_none());
    }
}
