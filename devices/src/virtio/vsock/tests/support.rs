//! Helpers: a "guest" that talks to a `Muxer` with plain headers, and fd counting.

use std::time::{Duration, Instant};

use crate::virtio::vsock::defs::*;
use crate::virtio::vsock::header::Header;
use crate::virtio::vsock::muxer::Muxer;

pub const GUEST_CID: u64 = 3;

pub fn hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 256 * 1024,
        ..Header::default()
    }
}

pub fn send(m: &mut Muxer, op: u16, src_port: u32, dst_port: u32, data: &[u8]) {
    let mut h = hdr(op, src_port, dst_port);
    h.len = data.len() as u32;
    m.on_guest_packet(&h, data);
}

/// Everything the muxer has for the guest right now.
pub fn recv_all(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while let Some(n) = {
        let mut h = Header::default();
        m.fill_rx_packet(&mut h, &mut buf).map(|n| (h, n))
    } {
        out.push((n.0, buf[..n.1].to_vec()));
    }
    out
}

/// Runs the muxer's host side until `done` holds (or fails the test after 5 s).
pub fn pump_until(m: &mut Muxer, mut done: impl FnMut(&mut Muxer) -> bool) {
    let start = Instant::now();
    loop {
        m.process_host_events(Instant::now());
        if done(m) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "muxer never reached the expected state"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Pumps until packets for the guest show up, and returns them.
pub fn pump_recv(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
    pump_until(m, |m| m.has_pending_rx());
    recv_all(m)
}

pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}
