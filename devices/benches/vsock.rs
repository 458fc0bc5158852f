//! vsock benchmark (harness = false): `cargo bench -p devices --bench vsock`.
//!
//! 1. VMM-side cost per packet: the device driven through mock virtqueues (mock guest memory,
//!    a mock driver posting descriptor chains), host end a Unix socket drained by a thread.
//!    Only the time inside the device's queue handlers is counted.
//! 2. Throughput through the muxer alone (no virtqueues) to and from a Unix socket.

#[path = "../src/virtio/vsock/tests/driver.rs"]
mod driver;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use devices::interrupt::CountingLine;
use devices::virtio::vsock::backend::UdsBackend;
use devices::virtio::vsock::defs::*;
use devices::virtio::vsock::header::Header;
use devices::virtio::vsock::muxer::Muxer;
use devices::virtio::vsock::{Vsock, VsockConfig};
use devices::virtio::{ActivationContext, VirtioDevice, VirtioInterrupt};
use driver::{Driver, Layout};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const GUEST_CID: u64 = 3;
const HOST_PORT: u32 = 5000;
const GUEST_PORT: u32 = 1234;

fn guest_hdr(op: u16, len: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: GUEST_PORT,
        dst_port: HOST_PORT,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt,
    }
}

struct Row {
    name: &'static str,
    size: usize,
    packets: u64,
    elapsed: Duration,
}

impl Row {
    fn print(&self) {
        let ns = self.elapsed.as_nanos() as f64 / self.packets.max(1) as f64;
        let mbs = (self.size as f64 * self.packets as f64) / self.elapsed.as_secs_f64() / 1e6;
        println!(
            "{:<40} {:>9} {:>10} {:>12.0} {:>10.1}",
            self.name, self.size, self.packets, ns, mbs
        );
    }
}

/// A host socket that swallows everything, counting bytes.
fn drain(mut s: UnixStream, count: Arc<AtomicU64>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
    })
}

/// A host socket that writes as fast as the muxer reads, until `stop`.
fn flood(mut s: UnixStream, stop: Arc<AtomicU64>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let buf = vec![0x5au8; 256 * 1024];
        while stop.load(Ordering::Relaxed) == 0 {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    })
}

struct DeviceRig {
    dev: Vsock,
    driver: Driver,
    host: UnixStream,
    _dir: tempfile::TempDir,
}

fn device_rig() -> DeviceRig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", path.display())).unwrap();
    let mut config = VsockConfig::new(GUEST_CID).unwrap();
    config.uds_path = Some(path);
    let mut dev = Vsock::with_vhost_probe(config, false).unwrap();
    let mut driver = Driver::new(3, 256);
    let ctx = ActivationContext {
        mem: driver.mem.clone(),
        acked_features: 1 << 32,
        queues: (0..3).map(|q| driver.queue(q)).collect(),
        queue_events: (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect(),
        interrupt: Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::default()))),
    };
    dev.activate(ctx).unwrap();
    driver.post_rx(RXQ, 4096, Layout::Single);
    driver.send(
        TXQ,
        &guest_hdr(OP_REQUEST, 0, 0).to_bytes(),
        &[],
        Layout::Single,
    );
    dev.handle_tx_kick();
    let rx = driver.take_rx(RXQ);
    assert_eq!(Header::from_bytes(&rx[0].0).op, OP_RESPONSE);
    driver.take_used(TXQ);
    let (host, _) = listener.accept().unwrap();
    DeviceRig {
        dev,
        driver,
        host,
        _dir: dir,
    }
}

/// Guest -> host through the TX queue; counts time inside `handle_tx_kick`.
fn device_tx(size: usize, total_bytes: u64) -> Row {
    let mut rig = device_rig();
    let received = Arc::new(AtomicU64::new(0));
    let t = drain(rig.host.try_clone().unwrap(), received.clone());
    let data = vec![0xa5u8; size];
    // Never more in flight than the device's buffer (its credit to the guest).
    let batch = (CONN_TX_BUF_SIZE as u64 / size as u64).clamp(1, 64);
    let packets = (total_bytes / size as u64).max(batch) / batch * batch;
    let mut sent = 0u64;
    let mut elapsed = Duration::ZERO;
    for _ in 0..packets / batch {
        for _ in 0..batch {
            let h = guest_hdr(OP_RW, size as u32, 0);
            rig.driver.send(TXQ, &h.to_bytes(), &data, Layout::Single);
        }
        let start = Instant::now();
        rig.dev.handle_tx_kick();
        elapsed += start.elapsed();
        rig.driver.take_used(TXQ);
        sent += batch * size as u64;
        // Honour the device's credit: let the host catch up before the next batch. Flushing
        // buffered data (socket writable events) is VMM work too, so it is timed.
        while received.load(Ordering::Relaxed) < sent {
            assert_eq!(rig.dev.connection_count(), 1, "device reset the connection");
            let start = Instant::now();
            rig.dev.handle_host_events();
            elapsed += start.elapsed();
            thread::yield_now();
        }
        rig.driver.take_rx(RXQ);
    }
    assert_eq!(rig.dev.connection_count(), 1, "connection survived");
    drop(rig);
    t.join().unwrap();
    Row {
        name: "device TX: guest -> unix socket",
        size,
        packets,
        elapsed,
    }
}

/// Host -> guest through the RX queue; counts time inside the device's handlers.
fn device_rx(buf_size: u32, total_bytes: u64) -> Row {
    let mut rig = device_rig();
    let stop = Arc::new(AtomicU64::new(0));
    let t = flood(rig.host.try_clone().unwrap(), stop.clone());
    let mut received = 0u64;
    let mut packets = 0u64;
    let mut elapsed = Duration::ZERO;
    // Buffers posted and not yet used; the ring has 256 entries and the driver 128 slots.
    let mut outstanding = 0usize;
    while received < total_bytes {
        while outstanding < 64 {
            rig.driver.post_rx(RXQ, buf_size, Layout::Single);
            outstanding += 1;
        }
        let start = Instant::now();
        rig.dev.handle_host_events();
        elapsed += start.elapsed();
        for (h, data) in rig.driver.take_rx(RXQ) {
            outstanding -= 1;
            if Header::from_bytes(&h).op == OP_RW {
                received += data.len() as u64;
                packets += 1;
            }
        }
        // Give the guest's credit back.
        let upd = guest_hdr(OP_CREDIT_UPDATE, 0, received as u32);
        rig.driver.send(TXQ, &upd.to_bytes(), &[], Layout::Single);
        // New credit lets the device fill RX buffers right away: also VMM time.
        let start = Instant::now();
        rig.dev.handle_tx_kick();
        elapsed += start.elapsed();
        rig.driver.take_used(TXQ);
        for (h, data) in rig.driver.take_rx(RXQ) {
            outstanding -= 1;
            if Header::from_bytes(&h).op == OP_RW {
                received += data.len() as u64;
                packets += 1;
            }
        }
    }
    stop.store(1, Ordering::Relaxed);
    drop(rig);
    t.join().unwrap();
    Row {
        name: "device RX: unix socket -> guest",
        size: (received / packets.max(1)) as usize,
        packets,
        elapsed,
    }
}

fn muxer_rig() -> (Muxer, UnixStream, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", path.display())).unwrap();
    let uds = UdsBackend::bind(&path).unwrap();
    let mut m = Muxer::new(GUEST_CID, vec![Box::new(uds)]).unwrap();
    m.on_guest_packet(&guest_hdr(OP_REQUEST, 0, 0), &[]);
    let mut h = Header::default();
    m.fill_rx_packet(&mut h, &mut []).unwrap();
    let (host, _) = listener.accept().unwrap();
    (m, host, dir)
}

fn muxer_tx(size: usize, total_bytes: u64) -> Row {
    let (mut m, host, _dir) = muxer_rig();
    let received = Arc::new(AtomicU64::new(0));
    let t = drain(host.try_clone().unwrap(), received.clone());
    let data = vec![1u8; size];
    let per_round = (CONN_TX_BUF_SIZE as usize / size).max(1) as u64;
    let packets = (total_bytes / size as u64).max(per_round) / per_round * per_round;
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    let mut sent = 0u64;
    for _ in 0..packets / per_round {
        for _ in 0..per_round {
            m.on_guest_packet(&guest_hdr(OP_RW, size as u32, 0), &data);
        }
        sent += per_round * size as u64;
        while received.load(Ordering::Relaxed) < sent {
            assert_eq!(m.connection_count(), 1, "muxer reset the connection");
            m.process_host_events(Instant::now());
            let mut h = Header::default();
            while m.fill_rx_packet(&mut h, &mut buf).is_some() {}
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(m.connection_count(), 1);
    drop(m);
    drop(host);
    t.join().unwrap();
    Row {
        name: "muxer: guest -> unix socket (wall)",
        size,
        packets,
        elapsed,
    }
}

fn muxer_rx(total_bytes: u64) -> Row {
    let (mut m, host, _dir) = muxer_rig();
    let stop = Arc::new(AtomicU64::new(0));
    let t = flood(host.try_clone().unwrap(), stop.clone());
    let mut buf = vec![0u8; MAX_PKT_DATA as usize];
    let mut received = 0u64;
    let mut packets = 0u64;
    let start = Instant::now();
    while received < total_bytes {
        m.process_host_events(Instant::now());
        let mut h = Header::default();
        while let Some(n) = m.fill_rx_packet(&mut h, &mut buf) {
            received += n as u64;
            packets += u64::from(h.op == OP_RW);
        }
        m.on_guest_packet(&guest_hdr(OP_CREDIT_UPDATE, 0, received as u32), &[]);
    }
    let elapsed = start.elapsed();
    stop.store(1, Ordering::Relaxed);
    drop(m);
    drop(host);
    t.join().unwrap();
    Row {
        name: "muxer: unix socket -> guest (wall)",
        size: (received / packets.max(1)) as usize,
        packets,
        elapsed,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let total: u64 = if quick { 8 << 20 } else { 256 << 20 };
    println!(
        "{:<40} {:>9} {:>10} {:>12} {:>10}",
        "scenario", "pkt bytes", "packets", "ns/packet", "MB/s"
    );
    for size in [64usize, 4096, 65536] {
        let bytes = if size == 64 { total / 64 } else { total };
        device_tx(size, bytes).print();
    }
    device_rx(4096, total).print();
    device_rx(MAX_PKT_DATA, total).print();
    for size in [4096usize, 65536] {
        muxer_tx(size, total).print();
    }
    muxer_rx(total).print();
}
