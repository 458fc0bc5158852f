//! What the guest test program listens on and how each port talks. Every port serves one
//! request per connection:
//!
//! - `ECHO_PORT`: every byte read is written back; EOF from the peer half-closes our side.
//! - `SINK_PORT`: reads to EOF, then answers `<bytes> <sha256-hex>\n`.
//! - `SOURCE_PORT`: reads `<len> <seed>\n`, sends `len` bytes of `Pattern::new(seed)`, then
//!   `<sha256-hex>\n` of what it sent, then closes.
//! - `DIAL_PORT`: reads `<host_port> <len> <seed>\n`, connects to host CID 2 on `host_port`,
//!   sends `len` pattern bytes, half-closes, reads what the host sends back to EOF and answers
//!   `DIALED local_port=<p> sent=<len> sha=<hex> echoed=<bytes> echo_sha=<hex>\n` (or
//!   `DIAL-ERROR <why>\n`).
//! - `STATS_PORT`: answers `accepted=<n> active=<n> errors=<n>\n` about the other ports.

use sha2::{Digest, Sha256};

pub const ECHO_PORT: u32 = 5000;
pub const SINK_PORT: u32 = 5001;
pub const SOURCE_PORT: u32 = 5002;
pub const DIAL_PORT: u32 = 5003;
pub const STATS_PORT: u32 = 5004;

/// Printed on the console once every port listens: `<marker> cid=<local cid>`.
pub const READY_MARKER: &str = "DORMOUSE-VSOCK-TEST READY";

/// Request lines are short; anything longer is a broken peer.
pub const MAX_REQUEST_LINE: usize = 128;

/// A deterministic byte stream: byte `i` is byte `i % 8` of `splitmix64(seed + i / 8)`. Both
/// ends can produce (and check) it in chunks of any size without sending it around first.
#[derive(Debug, Clone)]
pub struct Pattern {
    seed: u64,
    pos: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Self { seed, pos: 0 }
    }

    /// Fills `buf` with the next `buf.len()` bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut word = self.word();
        for b in buf.iter_mut() {
            let lane = (self.pos % 8) as usize;
            if lane == 0 {
                word = self.word();
            }
            *b = word[lane];
            self.pos = self.pos.wrapping_add(1);
        }
    }

    fn word(&self) -> [u8; 8] {
        splitmix64(self.seed.wrapping_add(self.pos / 8)).to_le_bytes()
    }
}

/// The first `len` bytes of `Pattern::new(seed)`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    Pattern::new(seed).fill(&mut v);
    v
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 of the first `len` bytes of `Pattern::new(seed)`, without holding them all.
pub fn pattern_sha256_hex(seed: u64, len: u64) -> String {
    let mut p = Pattern::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        p.fill(chunk);
        h.update(&*chunk);
        left -= n as u64;
    }
    hex(&h.finalize())
}

/// `<len> <seed>` (the SOURCE request).
pub fn parse_source_request(line: &str) -> Option<(u64, u64)> {
    let mut it = line.split_whitespace();
    let len = it.next()?.parse().ok()?;
    let seed = it.next()?.parse().ok()?;
    it.next().is_none().then_some((len, seed))
}

/// `<host_port> <len> <seed>` (the DIAL request).
pub fn parse_dial_request(line: &str) -> Option<(u32, u64, u64)> {
    let mut it = line.split_whitespace();
    let port = it.next()?.parse().ok()?;
    let len = it.next()?.parse().ok()?;
    let seed = it.next()?.parse().ok()?;
    it.next().is_none().then_some((port, len, seed))
}

/// The STATS answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsReport {
    /// Connections accepted on the data ports (STATS itself is not counted).
    pub accepted: u64,
    /// Data-port connections whose handler is still running.
    pub active: u64,
    /// Handlers that ended with an I/O error (a peer reset, a killed client).
    pub errors: u64,
}

impl StatsReport {
    pub fn to_line(&self) -> String {
        format!(
            "accepted={} active={} errors={}\n",
            self.accepted, self.active, self.errors
        )
    }

    pub fn parse(line: &str) -> Option<Self> {
        let mut r = Self::default();
        let mut seen = 0;
        for field in line.split_whitespace() {
            let (k, v) = field.split_once('=')?;
            let v: u64 = v.parse().ok()?;
            match k {
                "accepted" => r.accepted = v,
                "active" => r.active = v,
                "errors" => r.errors = v,
                _ => return None,
            }
            seen += 1;
        }
        (seen == 3).then_some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_does_not_depend_on_chunking() {
        let whole = pattern(7, 1000);
        let mut p = Pattern::new(7);
        let mut pieces = Vec::new();
        for size in [1, 3, 8, 13, 100, 875] {
            let mut b = vec![0; size];
            p.fill(&mut b);
            pieces.extend(b);
        }
        assert_eq!(pieces, whole);
        assert_ne!(pattern(8, 1000), whole, "the seed matters");
        assert_eq!(pattern_sha256_hex(7, 1000), sha256_hex(&whole));
    }

    #[test]
    fn requests_parse_and_reject_garbage() {
        assert_eq!(parse_source_request("16 9"), Some((16, 9)));
        assert_eq!(parse_source_request("16"), None);
        assert_eq!(parse_source_request("16 9 1"), None);
        assert_eq!(parse_dial_request("6000 5 1\n"), Some((6000, 5, 1)));
        assert_eq!(parse_dial_request("x 5 1"), None);
        let s = StatsReport {
            accepted: 3,
            active: 1,
            errors: 2,
        };
        assert_eq!(StatsReport::parse(&s.to_line()), Some(s));
        assert_eq!(StatsReport::parse("accepted=1"), None);
    }
}
