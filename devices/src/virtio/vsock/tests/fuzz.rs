//! Randomized inputs: headers to the muxer, raw descriptor chains to the device. Seeded, so a
//! failure reproduces.

use std::os::unix::net::UnixListener;
use std::time::Instant;

use super::driver::{Driver, HDR};
use super::support::{open_fds, GUEST_CID};
use crate::virtio::vsock::backend::UdsBackend;
use crate::virtio::vsock::defs::*;
use crate::virtio::vsock::header::Header;
use crate::virtio::vsock::muxer::Muxer;
use crate::virtio::vsock::{Vsock, VsockConfig};
use crate::virtio::{ActivationContext, VirtioDevice, VirtioInterrupt};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

fn random_header(rng: &mut XorShift) -> Header {
    Header {
        src_cid: if rng.below(10) == 0 {
            rng.next()
        } else {
            GUEST_CID
        },
        dst_cid: if rng.below(10) == 0 {
            rng.next()
        } else {
            HOST_CID
        },
        src_port: rng.below(4) as u32,
        dst_port: rng.pick(&[1u32, 2, 3, LOCAL_PORT_BASE]),
        len: 0,
        type_: if rng.below(20) == 0 {
            rng.next() as u16
        } else {
            TYPE_STREAM
        },
        op: rng.below(9) as u16,
        flags: rng.below(4) as u32,
        buf_alloc: rng.pick(&[0u32, 1, 100, 64 * 1024, u32::MAX]),
        fwd_cnt: rng.next() as u32,
    }
}

#[test]
fn random_packets_to_the_muxer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    // Ports 1 and 2 have listeners; 3 has none.
    let l1 = UnixListener::bind(format!("{}_1", path.display())).unwrap();
    let l2 = UnixListener::bind(format!("{}_2", path.display())).unwrap();
    l1.set_nonblocking(true).unwrap();
    l2.set_nonblocking(true).unwrap();
    let mut m = Muxer::new(GUEST_CID, vec![Box::new(UdsBackend::bind(&path).unwrap())]).unwrap();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut hosts = Vec::new();
    let payload = vec![0xa5u8; 70 * 1024];
    for i in 0..20_000 {
        let mut h = random_header(&mut rng);
        let len = rng.pick(&[0usize, 1, 100, 4096, 64 * 1024]);
        h.len = if rng.below(10) == 0 {
            rng.next() as u32
        } else {
            len as u32
        };
        m.on_guest_packet(&h, &payload[..len]);
        // Accept and feed a few host streams so connections carry data.
        for l in [&l1, &l2] {
            if let Ok((mut s, _)) = l.accept() {
                s.set_nonblocking(true).unwrap();
                let _ = std::io::Write::write(&mut s, &payload[..rng.below(9000) as usize]);
                hosts.push(s);
            }
        }
        if i % 7 == 0 && !hosts.is_empty() {
            // Host endpoints disappear at random.
            hosts.swap_remove(rng.below(hosts.len() as u64) as usize);
        }
        if i % 3 == 0 {
            m.process_host_events(Instant::now());
        }
        let mut buf = vec![0u8; rng.pick(&[0usize, 1, 512, 4096, 65536])];
        let mut h = Header::default();
        while let Some(n) = m.fill_rx_packet(&mut h, &mut buf) {
            assert!(n <= buf.len());
            assert_eq!(h.len as usize, n);
            assert_eq!(
                (h.src_cid, h.dst_cid, h.type_),
                (HOST_CID, GUEST_CID, TYPE_STREAM)
            );
            assert!(
                (OP_REQUEST..=OP_CREDIT_REQUEST).contains(&h.op),
                "op {}",
                h.op
            );
            assert!(n == 0 || h.op == OP_RW);
        }
        assert!(m.connection_count() <= MAX_CONNECTIONS);
    }
    drop(hosts);
    m.reset_all_connections();
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn random_descriptor_chains_to_the_device() {
    let fds_before = open_fds();
    let mut dev = Vsock::with_vhost_probe(VsockConfig::new(GUEST_CID).unwrap(), false).unwrap();
    let mut driver = Driver::new(3, 64);
    let line = std::sync::Arc::new(crate::interrupt::CountingLine::default());
    let ctx = ActivationContext {
        mem: driver.mem.clone(),
        acked_features: 1 << 32,
        queues: (0..3).map(|q| driver.queue(q)).collect(),
        queue_events: (0..3)
            .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
            .collect(),
        interrupt: std::sync::Arc::new(VirtioInterrupt::new(line)),
    };
    dev.activate(ctx).unwrap();
    let mut rng = XorShift(42);
    let mem_end = 0x40_0000u64;
    for _ in 0..3_000 {
        let q = rng.pick(&[RXQ, TXQ, TXQ]);
        let base = driver.next_slot_addr(q).0;
        // Random bytes where the header would be, sometimes a plausible header.
        let mut raw = [0u8; HDR];
        for b in raw.iter_mut() {
            *b = rng.next() as u8;
        }
        if rng.below(2) == 0 {
            let mut h = random_header(&mut rng);
            h.len = rng.pick(&[0u32, 1, 64, 4096, MAX_PKT_DATA, MAX_PKT_DATA + 1, u32::MAX]);
            raw = h.to_bytes();
        }
        vm_memory::Bytes::write_slice(&driver.mem, &raw, vm_memory::GuestAddress(base)).unwrap();
        let n = 1 + rng.below(2) as usize;
        let descs: Vec<(u64, u32, u16)> = (0..n)
            .map(|i| {
                let addr = match rng.below(8) {
                    0 => rng.next(),
                    1 => mem_end - rng.below(64),
                    _ => base + i as u64 * 0x1000,
                };
                let len = rng.pick(&[0u32, 1, 43, 44, 45, 100, 4096, 70_000, u32::MAX]);
                let flags = rng.pick(&[0u16, 2]);
                (addr, len, flags)
            })
            .collect();
        driver.push_raw_chain(q, &descs);
        match q {
            RXQ => dev.handle_rx_kick(),
            _ => dev.handle_tx_kick(),
        }
        driver.take_used(RXQ);
        driver.take_used(TXQ);
    }
    assert!(dev.is_active());
    dev.reset();
    drop(dev);
    assert!(open_fds() <= fds_before + 100);
}
