//! The MMDS responder (`devices::mmds`) on arbitrary guest frame sequences: whatever the guest
//! sends (ARP, IPv4, TCP segments with any flags, sequence numbers and payloads: received
//! checksums are not checked, so the fuzzer reaches TCP and HTTP), nothing panics, the frames
//! waiting for the guest stay bounded and each fits an Ethernet MTU. Each frame's bytes also
//! go through the HTTP request handler as a connection's data.
//!
//! Input: frames, each a 2-byte little-endian length and that many bytes; after each frame, a
//! byte whose low bit says whether the guest takes its pending frames now.

#![no_main]

use devices::mmds::http;
use devices::mmds::stack::MAX_PENDING_FRAMES;
use devices::mmds::{MmdsVersion, Responder, SharedMmds, DEFAULT_IPV4};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let shared = SharedMmds::default();
    {
        let mut mmds = shared.lock();
        mmds.store
            .set_version(MmdsVersion::V2, data.first().is_some_and(|b| b & 1 == 1));
        let _ = mmds
            .store
            .put(serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-1"}}}));
    }
    // A fixed seed: the same input meets the same TCP sequence numbers.
    let mut responder = Responder::with_seed(DEFAULT_IPV4, shared.clone(), 1);
    let mut rest = data;
    for _ in 0..256 {
        let [lo, hi, tail @ ..] = rest else { break };
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (frame, tail) = tail.split_at(len);
        responder.receive(frame);
        let _ = http::handle(&mut shared.lock(), frame, std::time::Instant::now());
        let (take, tail) = match tail {
            [flag, tail @ ..] => (flag & 1 == 1, tail),
            [] => (true, tail),
        };
        rest = tail;
        if take {
            while let Some(out) = responder.pop_frame() {
                assert!(
                    out.len() <= 1514,
                    "a {}-byte frame for the guest",
                    out.len()
                );
            }
        }
        assert!(responder.pending() <= MAX_PENDING_FRAMES);
    }
});
