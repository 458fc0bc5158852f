//! virtio-vsock (userspace datapath) cost per packet with a mock guest driver: the real device
//! driven through split queues in mock guest memory, its host end a Unix socket (the hybrid
//! vsock backend) served by a thread. Only the time inside the device's handlers counts, as
//! this thread's CPU time (exact, `CLOCK_THREAD_CPUTIME_ID`, so a loaded host does not inflate
//! it) and as wall time; the driver's work and the host thread do not.
//!
//! Also the muxer alone (no virtqueues, no guest memory) to and from a Unix socket, timed over
//! the whole loop. Shared by `cargo bench -p devices --bench vsock` and
//! `dormouse bench vsock`.

use std::io::{self, Read, Write};
use std::os::unix::io::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::split_queue::{DescSpec, DriverQueue, RingLayout};
use crate::BenchError;
use devices::interrupt::CountingLine;
use devices::virtio::vsock::backend::UdsBackend;
use devices::virtio::vsock::defs::{
    CONN_TX_BUF_SIZE, HOST_CID, MAX_PKT_DATA, NUM_QUEUES, OP_CREDIT_UPDATE, OP_REQUEST,
    OP_RESPONSE, OP_RW, QUEUE_SIZE, RXQ, TXQ, TYPE_STREAM,
};
use devices::virtio::vsock::header::{Header, HEADER_SIZE};
use devices::virtio::vsock::muxer::Muxer;
use devices::virtio::vsock::{Vsock, VsockConfig};
use devices::virtio::{ActivationContext, VirtioDevice, VirtioInterrupt};
use devices::GuestMemory;

const GUEST_CID: u64 = 3;
/// The host port the mock guest connects to (the hybrid backend dials `<uds>_<port>`).
const HOST_PORT: u32 = 5000;
const GUEST_PORT: u32 = 1234;
/// What the mock guest advertises as its receive buffer.
const GUEST_BUF_ALLOC: u32 = 1 << 20;
/// Chains the driver keeps posted on the RX queue while measuring host -> guest.
const RX_IN_FLIGHT: u16 = 64;
/// Most TX packets posted per kick.
const TX_BATCH: u64 = 64;
/// Buffer room per descriptor slot: a header and the largest payload, page-rounded.
const SLOT_BYTES: u64 = 0x1_1000;
const RING_AREA: u64 = 0x4000;
const BUFFERS: u64 = 0x10_0000;
/// A row fails instead of hanging when nothing moves for this long.
const STALL: Duration = Duration::from_secs(10);

/// One measured vsock row.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VsockFigure {
    /// Data packets moved (RW; credit updates and the like not counted).
    pub packets: u64,
    /// Payload bytes they carried.
    pub bytes: u64,
    /// This thread's CPU time in the timed code.
    pub cpu: Duration,
    /// Wall time in the timed code.
    pub wall: Duration,
}

impl VsockFigure {
    /// VMM CPU per packet, in nanoseconds.
    pub fn ns_per_packet(&self) -> f64 {
        per_packet_ns(self.cpu, self.packets)
    }

    /// Wall time per packet, in nanoseconds (includes preemption on a busy host).
    pub fn wall_ns_per_packet(&self) -> f64 {
        per_packet_ns(self.wall, self.packets)
    }

    /// Packets per second of VMM CPU: the rate one fully busy VMM thread would sustain.
    pub fn packets_per_sec(&self) -> f64 {
        rate(self.packets as f64, self.cpu)
    }

    /// MiB of payload per second of VMM CPU.
    pub fn mib_per_sec(&self) -> f64 {
        rate(self.bytes as f64 / f64::from(1u32 << 20), self.cpu)
    }

    /// Average payload per packet.
    pub fn packet_bytes(&self) -> u64 {
        self.bytes.checked_div(self.packets).unwrap_or(0)
    }
}

fn per_packet_ns(d: Duration, packets: u64) -> f64 {
    if packets == 0 {
        return 0.0;
    }
    d.as_secs_f64() * 1e9 / packets as f64
}

fn rate(amount: f64, d: Duration) -> f64 {
    let secs = d.as_secs_f64();
    if secs > 0.0 {
        amount / secs
    } else {
        0.0
    }
}

/// This thread's CPU time so far: exact, including the running time slice (unlike
/// getrusage, which only sees it at the next tick or switch).
fn thread_cpu() -> Duration {
    // SAFETY: timespec is plain old data; all-zeroes is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes one timespec into `ts`, which outlives the call.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if ret != 0 {
        return Duration::ZERO;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(ts.tv_nsec).unwrap_or(0);
    Duration::new(secs, nanos)
}

/// Accumulates CPU and wall time spent inside `time` calls.
#[derive(Default)]
struct Stopwatch {
    cpu: Duration,
    wall: Duration,
}

impl Stopwatch {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let (cpu, wall) = (thread_cpu(), Instant::now());
        let out = f();
        self.wall += wall.elapsed();
        self.cpu += thread_cpu().saturating_sub(cpu);
        out
    }

    fn figure(&self, packets: u64, bytes: u64) -> VsockFigure {
        VsockFigure {
            packets,
            bytes,
            cpu: self.cpu,
            wall: self.wall,
        }
    }
}

/// Header of a packet the mock guest sends on its one connection.
fn guest_header(op: u16, len: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: GUEST_PORT,
        dst_port: HOST_PORT,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt,
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), BenchError> {
    if ok {
        Ok(())
    } else {
        Err(BenchError::Check(what()))
    }
}

/// The guest side of the three vsock queues; every chain is one descriptor (header and data
/// together, as Linux >= 6.2 sends them) whose buffer slot is its descriptor index.
struct VsockDriver {
    mem: GuestMemory,
    queues: Vec<DriverQueue>,
}

impl VsockDriver {
    fn new() -> Result<Self, BenchError> {
        let slots = u64::from(QUEUE_SIZE) * NUM_QUEUES as u64;
        let bytes = BUFFERS + slots * SLOT_BYTES;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), bytes as usize)])
            .map_err(BenchError::memory)?;
        let queues = (0..NUM_QUEUES as u64)
            .map(|q| {
                DriverQueue::new(
                    &mem,
                    RingLayout::packed(GuestAddress(q * RING_AREA), QUEUE_SIZE),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { mem, queues })
    }

    fn queue(&mut self, q: usize) -> Result<&mut DriverQueue, BenchError> {
        self.queues
            .get_mut(q)
            .ok_or_else(|| BenchError::Check(format!("no queue {q}")))
    }

    fn slot(q: usize, index: u16) -> GuestAddress {
        let slot = q as u64 * u64::from(QUEUE_SIZE) + u64::from(index % QUEUE_SIZE);
        GuestAddress(BUFFERS + slot * SLOT_BYTES)
    }

    /// Posts one single-descriptor chain on `q` and publishes it.
    fn post(&mut self, q: usize, len: u32, flags: u16) -> Result<GuestAddress, BenchError> {
        let queue = self.queue(q)?;
        check(queue.in_flight() < QUEUE_SIZE, || {
            format!("queue {q} is full")
        })?;
        let index = queue.avail_idx() % QUEUE_SIZE;
        let addr = Self::slot(q, index);
        queue.set_desc(
            index,
            DescSpec {
                addr: addr.0,
                len,
                flags,
                next: 0,
            },
        )?;
        queue.make_available(index)?;
        queue.publish()?;
        Ok(addr)
    }

    /// Queues a packet on the TX queue.
    fn send(&mut self, hdr: &Header, data: &[u8]) -> Result<(), BenchError> {
        let q = TXQ;
        let index = self.queue(q)?.avail_idx() % QUEUE_SIZE;
        let addr = Self::slot(q, index);
        self.mem
            .write_slice(&hdr.to_bytes(), addr)
            .map_err(BenchError::memory)?;
        self.mem
            .write_slice(data, GuestAddress(addr.0 + HEADER_SIZE as u64))
            .map_err(BenchError::memory)?;
        let len = u32::try_from(HEADER_SIZE + data.len()).map_err(BenchError::memory)?;
        self.post(q, len, 0)?;
        Ok(())
    }

    /// Posts one device-writable RX buffer with room for `data_len` payload bytes.
    fn post_rx(&mut self, data_len: u32) -> Result<(), BenchError> {
        let write = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        self.post(RXQ, HEADER_SIZE as u32 + data_len, write)?;
        Ok(())
    }

    /// TX chains the device returned.
    fn reap_tx(&mut self) -> Result<u64, BenchError> {
        let queue = self.queue(TXQ)?;
        let mut n = 0;
        while queue.pop_used()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    /// Headers and payload lengths of the RX packets the device filled.
    fn take_rx(&mut self) -> Result<Vec<(Header, usize)>, BenchError> {
        let mut out = Vec::new();
        while let Some(used) = self.queue(RXQ)?.pop_used()? {
            let len = used.len as usize;
            let data_len = len
                .checked_sub(HEADER_SIZE)
                .ok_or_else(|| BenchError::Check(format!("RX packet of {len} bytes")))?;
            let mut raw = [0u8; HEADER_SIZE];
            self.mem
                .read_slice(&mut raw, Self::slot(RXQ, used.id))
                .map_err(BenchError::memory)?;
            out.push((Header::from_bytes(&raw), data_len));
        }
        Ok(out)
    }
}

/// A scratch directory for the hybrid sockets, removed on drop (bound sockets outlive it).
struct SocketDir(PathBuf);

impl SocketDir {
    fn new() -> Result<Self, BenchError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("dormouse-vsock-bench-{}-{seq}", std::process::id()));
        std::fs::create_dir(&dir).map_err(BenchError::io(format!("creating {}", dir.display())))?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Binds `<uds>_<HOST_PORT>`, where the hybrid backend delivers guest-initiated connections.
fn host_listener(uds: &Path) -> Result<UnixListener, BenchError> {
    let path = format!("{}_{HOST_PORT}", uds.display());
    UnixListener::bind(&path).map_err(BenchError::io(format!("binding {path}")))
}

/// The activated device with one established guest-initiated connection, and its host end.
struct DeviceRig {
    dev: Vsock,
    driver: VsockDriver,
    host: UnixStream,
    host_events: RawFd,
}

impl DeviceRig {
    fn new() -> Result<Self, BenchError> {
        let dir = SocketDir::new()?;
        let uds = dir.path().join("v.sock");
        let listener = host_listener(&uds)?;
        let mut config = VsockConfig::new(GUEST_CID).map_err(|e| BenchError::Setup {
            what: "vsock config",
            why: e.to_string(),
        })?;
        config.uds_path = Some(uds);
        let mut dev = Vsock::with_vhost_probe(config, false).map_err(|e| BenchError::Setup {
            what: "vsock device",
            why: e.to_string(),
        })?;
        let host_events = dev.host_events_fd().ok_or(BenchError::Setup {
            what: "vsock device",
            why: "no userspace datapath".into(),
        })?;
        let mut driver = VsockDriver::new()?;
        let queue_events = (0..NUM_QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(BenchError::io("creating queue eventfds"))?;
        let ctx = ActivationContext {
            mem: driver.mem.clone(),
            acked_features: 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1,
            queues: driver
                .queues
                .iter()
                .map(|q| q.device_queue(false))
                .collect::<Result<Vec<_>, _>>()?,
            queue_events,
            interrupt: Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::default()))),
        };
        dev.activate(ctx).map_err(|e| BenchError::Setup {
            what: "vsock activation",
            why: e.to_string(),
        })?;
        // The guest connects to the host port; the device dials the listener.
        driver.post_rx(MAX_PKT_DATA)?;
        driver.send(&guest_header(OP_REQUEST, 0, 0), &[])?;
        dev.handle_tx_kick();
        driver.reap_tx()?;
        let answer = driver.take_rx()?;
        check(
            answer.first().is_some_and(|(h, _)| h.op == OP_RESPONSE),
            || format!("the device answered the connection request with {answer:?}"),
        )?;
        let (host, _) = listener
            .accept()
            .map_err(BenchError::io("accepting the device's connection"))?;
        Ok(Self {
            dev,
            driver,
            host,
            host_events,
        })
    }

    fn check_connected(&self) -> Result<(), BenchError> {
        check(self.dev.connection_count() == 1, || {
            "the device dropped the connection".into()
        })
    }

    /// Waits up to `timeout` for host-side work, as the event loop's epoll would.
    fn host_events_ready(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.host_events,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd that outlives the call.
        unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
    }
}

/// Counts what the host end reads until EOF.
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

/// Writes to the host end as fast as the device reads, until `stop` or an error.
fn flood(mut s: UnixStream, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let buf = vec![0x5au8; 256 * 1024];
        while !stop.load(Ordering::Relaxed) {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    })
}

fn valid_packet_size(size: usize) -> Result<(), BenchError> {
    check((1..=MAX_PKT_DATA as usize).contains(&size), || {
        format!("packet size {size} outside 1..={MAX_PKT_DATA}")
    })
}

/// Guest -> host: `size`-byte packets through the TX queue to the host socket, about
/// `total_bytes` in all. Counts the device's TX handling and its flushing of data the socket
/// could not take at once.
pub fn device_tx(size: usize, total_bytes: u64) -> Result<VsockFigure, BenchError> {
    valid_packet_size(size)?;
    let mut rig = DeviceRig::new()?;
    let received = Arc::new(AtomicU64::new(0));
    let host = rig
        .host
        .try_clone()
        .map_err(BenchError::io("cloning the host socket"))?;
    let reader = drain(host, received.clone());
    let result = tx_loop(&mut rig, size, total_bytes, &received);
    let _ = rig.host.shutdown(std::net::Shutdown::Both);
    drop(rig);
    let _ = reader.join();
    result
}

fn tx_loop(
    rig: &mut DeviceRig,
    size: usize,
    total_bytes: u64,
    received: &AtomicU64,
) -> Result<VsockFigure, BenchError> {
    let data = vec![0xa5u8; size];
    let len = size as u32;
    // Never more in flight than the device buffers for the connection (its credit to us).
    let batch = (u64::from(CONN_TX_BUF_SIZE) / size as u64).clamp(1, TX_BATCH);
    let rounds = (total_bytes / size as u64).div_ceil(batch).max(1);
    let mut clock = Stopwatch::default();
    let mut sent = 0u64;
    for _ in 0..rounds {
        for _ in 0..batch {
            rig.driver.send(&guest_header(OP_RW, len, 0), &data)?;
        }
        clock.time(|| rig.dev.handle_tx_kick());
        let reaped = rig.driver.reap_tx()?;
        check(reaped == batch, || {
            format!("{reaped} of {batch} TX chains used")
        })?;
        sent += batch * size as u64;
        // Let the host catch up before the next batch, flushing what the device buffered.
        let mut last = (received.load(Ordering::Relaxed), Instant::now());
        while received.load(Ordering::Relaxed) < sent {
            rig.check_connected()?;
            if rig.host_events_ready(Duration::from_millis(1)) {
                clock.time(|| rig.dev.handle_host_events());
            }
            let now = received.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            }
            check(last.1.elapsed() < STALL, || {
                format!("guest -> host stalled at {now} of {sent} bytes")
            })?;
        }
        // Credit updates the device queued for the guest: keep a buffer posted for them.
        rig.driver.take_rx()?;
        if rig.driver.queue(RXQ)?.in_flight() == 0 {
            rig.driver.post_rx(MAX_PKT_DATA)?;
        }
    }
    rig.check_connected()?;
    let packets = rounds * batch;
    Ok(clock.figure(packets, packets * size as u64))
}

/// Host -> guest: the host floods its socket, the device fills `buf_size`-byte RX buffers until
/// about `total_bytes` arrived; the mock guest returns credit after each round.
pub fn device_rx(buf_size: u32, total_bytes: u64) -> Result<VsockFigure, BenchError> {
    valid_packet_size(buf_size as usize)?;
    let mut rig = DeviceRig::new()?;
    let stop = Arc::new(AtomicBool::new(false));
    let host = rig
        .host
        .try_clone()
        .map_err(BenchError::io("cloning the host socket"))?;
    let writer = flood(host, stop.clone());
    let result = rx_loop(&mut rig, buf_size, total_bytes);
    stop.store(true, Ordering::Relaxed);
    let _ = rig.host.shutdown(std::net::Shutdown::Both);
    drop(rig);
    let _ = writer.join();
    result
}

fn rx_loop(
    rig: &mut DeviceRig,
    buf_size: u32,
    total_bytes: u64,
) -> Result<VsockFigure, BenchError> {
    let mut clock = Stopwatch::default();
    let (mut received, mut packets) = (0u64, 0u64);
    let mut last_progress = Instant::now();
    let mut count = |rig: &mut DeviceRig, received: &mut u64| -> Result<(), BenchError> {
        for (h, len) in rig.driver.take_rx()? {
            if h.op == OP_RW {
                *received += len as u64;
                packets += 1;
            }
        }
        Ok(())
    };
    while received < total_bytes {
        while rig.driver.queue(RXQ)?.in_flight() < RX_IN_FLIGHT {
            rig.driver.post_rx(buf_size)?;
        }
        clock.time(|| rig.dev.handle_host_events());
        let before = received;
        count(rig, &mut received)?;
        // Give the credit back; the new credit lets the device fill buffers right away.
        let fwd_cnt = received as u32; // wraps, as the protocol's counters do
        rig.driver
            .send(&guest_header(OP_CREDIT_UPDATE, 0, fwd_cnt), &[])?;
        clock.time(|| rig.dev.handle_tx_kick());
        rig.driver.reap_tx()?;
        count(rig, &mut received)?;
        rig.check_connected()?;
        if received != before {
            last_progress = Instant::now();
        }
        check(last_progress.elapsed() < STALL, || {
            format!("host -> guest stalled at {received} bytes")
        })?;
    }
    Ok(clock.figure(packets, received))
}

/// The muxer with one established guest-initiated connection, and its host end.
fn muxer_rig() -> Result<(Muxer, UnixStream), BenchError> {
    let dir = SocketDir::new()?;
    let uds = dir.path().join("v.sock");
    let listener = host_listener(&uds)?;
    let backend = UdsBackend::bind(&uds).map_err(|e| BenchError::Setup {
        what: "hybrid vsock backend",
        why: e.to_string(),
    })?;
    let mut m = Muxer::new(GUEST_CID, vec![Box::new(backend)])
        .map_err(BenchError::io("creating the muxer"))?;
    m.on_guest_packet(&guest_header(OP_REQUEST, 0, 0), &[]);
    let mut h = Header::default();
    m.fill_rx_packet(&mut h, &mut []);
    check(h.op == OP_RESPONSE, || {
        format!("the muxer answered the request with op {}", h.op)
    })?;
    let (host, _) = listener
        .accept()
        .map_err(BenchError::io("accepting the muxer's connection"))?;
    Ok((m, host))
}

/// Guest -> host through the muxer alone, timed over the whole loop.
pub fn muxer_tx(size: usize, total_bytes: u64) -> Result<VsockFigure, BenchError> {
    valid_packet_size(size)?;
    let (mut m, host) = muxer_rig()?;
    let received = Arc::new(AtomicU64::new(0));
    let reader = drain(
        host.try_clone()
            .map_err(BenchError::io("cloning the host socket"))?,
        received.clone(),
    );
    let data = vec![1u8; size];
    let per_round = (u64::from(CONN_TX_BUF_SIZE) / size as u64).max(1);
    let rounds = (total_bytes / size as u64).div_ceil(per_round).max(1);
    let mut buf = vec![0u8; 4096];
    let mut clock = Stopwatch::default();
    let result = clock.time(|| -> Result<(), BenchError> {
        let mut sent = 0u64;
        for _ in 0..rounds {
            for _ in 0..per_round {
                m.on_guest_packet(&guest_header(OP_RW, size as u32, 0), &data);
            }
            sent += per_round * size as u64;
            let mut last = (received.load(Ordering::Relaxed), Instant::now());
            while received.load(Ordering::Relaxed) < sent {
                check(m.connection_count() == 1, || {
                    "the muxer dropped the connection".into()
                })?;
                m.process_host_events(Instant::now());
                let mut h = Header::default();
                while m.fill_rx_packet(&mut h, &mut buf).is_some() {}
                let now = received.load(Ordering::Relaxed);
                if now != last.0 {
                    last = (now, Instant::now());
                }
                check(last.1.elapsed() < STALL, || {
                    format!("muxer guest -> host stalled at {now} of {sent} bytes")
                })?;
            }
        }
        Ok(())
    });
    let _ = host.shutdown(std::net::Shutdown::Both);
    drop(m);
    let _ = reader.join();
    result?;
    let packets = rounds * per_round;
    Ok(clock.figure(packets, packets * size as u64))
}

/// Host -> guest through the muxer alone, in packets of up to `MAX_PKT_DATA`, timed over the
/// whole loop.
pub fn muxer_rx(total_bytes: u64) -> Result<VsockFigure, BenchError> {
    let (mut m, host) = muxer_rig()?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = flood(
        host.try_clone()
            .map_err(BenchError::io("cloning the host socket"))?,
        stop.clone(),
    );
    let mut buf = vec![0u8; MAX_PKT_DATA as usize];
    let (mut received, mut packets) = (0u64, 0u64);
    let mut clock = Stopwatch::default();
    let result = clock.time(|| -> Result<(), BenchError> {
        let mut last_progress = Instant::now();
        while received < total_bytes {
            m.process_host_events(Instant::now());
            let mut h = Header::default();
            let before = received;
            while let Some(n) = m.fill_rx_packet(&mut h, &mut buf) {
                if h.op == OP_RW {
                    received += n as u64;
                    packets += 1;
                }
            }
            m.on_guest_packet(&guest_header(OP_CREDIT_UPDATE, 0, received as u32), &[]);
            if received != before {
                last_progress = Instant::now();
            }
            check(last_progress.elapsed() < STALL, || {
                format!("muxer host -> guest stalled at {received} bytes")
            })?;
        }
        Ok(())
    });
    stop.store(true, Ordering::Relaxed);
    let _ = host.shutdown(std::net::Shutdown::Both);
    drop(m);
    let _ = writer.join();
    result?;
    Ok(clock.figure(packets, received))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figure_rates_come_from_cpu_time() {
        let f = VsockFigure {
            packets: 1000,
            bytes: 4 << 20,
            cpu: Duration::from_millis(2),
            wall: Duration::from_millis(8),
        };
        assert!((f.ns_per_packet() - 2000.0).abs() < 1e-6);
        assert!((f.wall_ns_per_packet() - 8000.0).abs() < 1e-6);
        assert!((f.packets_per_sec() - 500_000.0).abs() < 1e-3);
        assert!((f.mib_per_sec() - 2000.0).abs() < 1e-6);
        assert_eq!(f.packet_bytes(), 4194);
        assert_eq!(VsockFigure::default().ns_per_packet(), 0.0);
        assert_eq!(VsockFigure::default().packets_per_sec(), 0.0);
    }

    #[test]
    fn device_moves_data_both_ways() {
        for size in [64, 4096, MAX_PKT_DATA as usize] {
            let f = device_tx(size, 1 << 20).unwrap();
            assert!(f.packets >= (1 << 20) / size as u64, "tx {size}: {f:?}");
            assert_eq!(f.bytes, f.packets * size as u64);
            assert_eq!(f.packet_bytes(), size as u64);
            assert!(f.cpu > Duration::ZERO && f.wall >= f.cpu / 2, "{f:?}");
            assert!(f.ns_per_packet() > 0.0 && f.packets_per_sec() > 0.0);
        }
        let f = device_rx(4096, 1 << 20).unwrap();
        assert!(f.bytes >= 1 << 20, "{f:?}");
        assert!(
            f.packets >= f.bytes / 4096,
            "packets fit the buffers: {f:?}"
        );
        assert!(f.cpu > Duration::ZERO, "{f:?}");
        assert!(device_tx(0, 1).is_err());
        assert!(device_rx(MAX_PKT_DATA + 1, 1).is_err());
    }

    #[test]
    fn muxer_moves_data_both_ways() {
        let f = muxer_tx(4096, 1 << 20).unwrap();
        assert!(f.bytes >= 1 << 20, "{f:?}");
        let f = muxer_rx(1 << 20).unwrap();
        assert!(f.bytes >= 1 << 20 && f.packets > 0, "{f:?}");
    }
}
