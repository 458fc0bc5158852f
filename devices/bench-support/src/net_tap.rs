//! virtio-net through a real TAP interface inside a network namespace the benchmark creates
//! (needs root). The whole device runs as the VMM runs it (event loop, TAP fd, queue eventfds,
//! irqfd); only the guest is mocked.
//!
//! - TX: the mock driver puts UDP frames for 172.30.0.1 on the TX queue; the device writes them
//!   to the TAP, and a UDP socket bound to 172.30.0.1 inside the namespace counts them. A window
//!   of frames in flight keeps the sink from overflowing, so sent and counted frames match.
//!   The kernel delivers a TAP write to the namespace's stack synchronously, so VMM CPU per TX
//!   frame includes the receiving stack's work up to the socket, as it would for a real VMM.
//! - RX: a thread in the namespace sends UDP datagrams to the guest's address (a permanent
//!   neighbour entry maps it to the guest MAC); the device reads them from the TAP into the RX
//!   buffers the mock driver keeps posted. The sender runs flat out; frames the TAP drops
//!   because the device is busy are the host's loss, not counted.
//!
//! Only 172.30.0.0/24 addresses, only inside the namespace; it is deleted afterwards.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::frames::{udp_frame, UdpEndpoint, UDP_FRAME_OVERHEAD};
use crate::net_mem::NetPath;
use crate::netns::NetNs;
use crate::split_queue::{DescSpec, DriverQueue, RingLayout};
use crate::{BenchError, CpuMeter, IoFigure};
use devices::interrupt::IrqFdLine;
use devices::rate_limiter::{RateLimiterConfig, RateLimiterUpdate};
use devices::virtio::net::{Net, Tap, VNET_HDR_LEN};
use devices::virtio::{ActivationContext, VirtioDevice, VirtioInterrupt};
use devices::GuestMemory;

pub const TAP_NAME: &str = "dmbench0";
/// The namespace is `<prefix><pid>`.
pub const NETNS_PREFIX: &str = "dm-bench-";
/// The TAP's address inside the namespace (the "host" side).
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
/// The mock guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 2);
const PREFIX_LEN: u8 = 24;
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0xac, 0x1e, 0x00, 0x01];
const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0xac, 0x1e, 0x00, 0x02];
const SINK_PORT: u16 = 5001;
const GUEST_PORT: u16 = 5002;

const QUEUE_SIZE: u16 = devices::virtio::net::QUEUE_SIZE;
const MEM_BYTES: usize = 4 << 20;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
/// Enough for a 1514-byte frame and its virtio-net header (no GSO is negotiated).
const BUF_LEN: u64 = 2048;
/// TX chains posted per kick.
const TX_BATCH: usize = 64;
/// TX frames allowed in flight between the device and the sink socket.
const TX_WINDOW: u64 = 512;
/// How long the TX side waits for the sink before calling frames lost.
const SINK_PATIENCE: Duration = Duration::from_millis(200);

/// UDP payload sizes of the standard rows: 60-byte and 1514-byte Ethernet frames.
pub const SMALL_PAYLOAD: usize = 18;
pub const MTU_PAYLOAD: usize = 1472;

/// Ethernet frame length (no FCS) for a UDP payload.
pub fn frame_len(payload: usize) -> usize {
    UDP_FRAME_OVERHEAD + payload
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

type SharedNet = Arc<Mutex<Net<Tap>>>;

pub struct TapBench {
    mem: GuestMemory,
    rx: DriverQueue,
    tx: DriverQueue,
    manager: EventManager<SharedNet>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    irq: EventFd,
    /// TX sink: bound to HOST_IP:SINK_PORT inside the namespace.
    sink: UdpSocket,
    /// RX source: inside the namespace, connected to GUEST_IP:GUEST_PORT.
    source: UdpSocket,
    /// The device (for its rate limiters and counters).
    net: SharedNet,
    /// Declared last so it is deleted after the TAP and sockets above are closed.
    ns: NetNs,
}

impl TapBench {
    /// Creates the namespace, the TAP inside it, the sockets, and an active virtio-net device
    /// on the TAP. Needs root.
    pub fn setup() -> Result<Self, BenchError> {
        crate::netns::remove_stale(NETNS_PREFIX);
        let ns = NetNs::create(&format!("{NETNS_PREFIX}{}", std::process::id()))?;
        // No IPv6 chatter (router solicitations, MLD) on the TAP to blur the RX count.
        ns.enter(disable_ipv6)?;
        let tap = ns
            .enter(|| Tap::open(TAP_NAME))?
            .map_err(|e| BenchError::Setup {
                what: "TAP",
                why: e.to_string(),
            })?;
        let host_mac = mac_string(HOST_MAC);
        let guest_mac = mac_string(GUEST_MAC);
        let host_cidr = format!("{HOST_IP}/{PREFIX_LEN}");
        let guest_ip = GUEST_IP.to_string();
        ns.ip(&["link", "set", TAP_NAME, "address", &host_mac, "up"])?;
        ns.ip(&["addr", "add", &host_cidr, "dev", TAP_NAME])?;
        ns.ip(&[
            "neigh",
            "replace",
            &guest_ip,
            "lladdr",
            &guest_mac,
            "dev",
            TAP_NAME,
            "nud",
            "permanent",
        ])?;
        let (sink, source) = ns.enter(open_sockets)??;

        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_BYTES)])
            .map_err(BenchError::memory)?;
        let rx = DriverQueue::new(&mem, RingLayout::packed(GuestAddress(RX_RING), QUEUE_SIZE))?;
        let tx = DriverQueue::new(&mem, RingLayout::packed(GuestAddress(TX_RING), QUEUE_SIZE))?;
        let net = Net::with_backend(tap, GUEST_MAC).map_err(|e| BenchError::Setup {
            what: "virtio-net device",
            why: e.to_string(),
        })?;
        let net: SharedNet = Arc::new(Mutex::new(net));
        let mut manager =
            EventManager::<SharedNet>::new().map_err(|e| BenchError::EventLoop(e.to_string()))?;
        manager.add_subscriber(net.clone());
        let new_evt = |what: &'static str| EventFd::new(EFD_NONBLOCK).map_err(BenchError::io(what));
        let (rx_kick, tx_kick, irq) = (
            new_evt("RX eventfd")?,
            new_evt("TX eventfd")?,
            new_evt("irq")?,
        );
        let dup = |e: &EventFd| {
            e.try_clone()
                .map_err(BenchError::io("duplicating an eventfd"))
        };
        let ctx = ActivationContext {
            mem: mem.clone(),
            acked_features: 1 << VIRTIO_F_VERSION_1,
            queues: vec![rx.device_queue(false)?, tx.device_queue(false)?],
            queue_events: vec![dup(&rx_kick)?, dup(&tx_kick)?],
            interrupt: Arc::new(VirtioInterrupt::new(Arc::new(IrqFdLine(dup(&irq)?)))),
        };
        net.lock()
            .map_err(|_| BenchError::Check("device lock poisoned".into()))?
            .activate(ctx)
            .map_err(|e| BenchError::Setup {
                what: "virtio-net activation",
                why: e.to_string(),
            })?;
        let mut bench = Self {
            mem,
            rx,
            tx,
            net,
            manager,
            rx_kick,
            tx_kick,
            irq,
            sink,
            source,
            ns,
        };
        // Registers the queue eventfds.
        bench.run_loop(100)?;
        Ok(bench)
    }

    pub fn namespace(&self) -> &str {
        self.ns.name()
    }

    /// One event-loop pass, waiting at most `timeout_ms`; returns the events handled.
    fn run_loop(&mut self, timeout_ms: i32) -> Result<usize, BenchError> {
        let n = self
            .manager
            .run_with_timeout(timeout_ms)
            .map_err(|e| BenchError::EventLoop(e.to_string()))?;
        // The guest would take the interrupt; an empty counter is fine.
        let _ = self.irq.read();
        Ok(n)
    }

    pub fn run(
        &mut self,
        path: NetPath,
        payload: usize,
        duration: Duration,
    ) -> Result<IoFigure, BenchError> {
        match path {
            NetPath::Tx => self.run_tx(payload, duration),
            NetPath::Rx => self.run_rx(payload, duration),
        }
    }

    /// Guest → TAP: frames counted by the sink socket inside the namespace.
    pub fn run_tx(&mut self, payload: usize, duration: Duration) -> Result<IoFigure, BenchError> {
        let guest = UdpEndpoint {
            mac: GUEST_MAC,
            ip: GUEST_IP,
            port: GUEST_PORT,
        };
        let host = UdpEndpoint {
            mac: HOST_MAC,
            ip: HOST_IP,
            port: SINK_PORT,
        };
        let eth = udp_frame(guest, host, payload).ok_or_else(|| BenchError::Setup {
            what: "TX frame",
            why: format!("UDP payload of {payload} bytes"),
        })?;
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(&eth);
        if frame.len() as u64 > BUF_LEN {
            return Err(BenchError::Setup {
                what: "TX frame",
                why: format!("{} bytes", frame.len()),
            });
        }
        for i in 0..QUEUE_SIZE {
            let addr = TX_BUFS + u64::from(i) * BUF_LEN;
            self.mem
                .write_slice(&frame, GuestAddress(addr))
                .map_err(BenchError::memory)?;
            self.tx.set_desc(
                i,
                DescSpec {
                    addr,
                    len: frame.len() as u32,
                    flags: 0,
                    next: 0,
                },
            )?;
        }
        let mut free: Vec<u16> = (0..QUEUE_SIZE).rev().collect();
        let sink = self
            .sink
            .try_clone()
            .map_err(BenchError::io("duplicating the sink socket"))?;
        sink.set_read_timeout(Some(Duration::from_millis(20)))
            .map_err(BenchError::io("sink timeout"))?;
        let received = AtomicU64::new(0);
        let stop = AtomicBool::new(false);

        std::thread::scope(|s| {
            s.spawn(|| count_datagrams(&sink, payload, &received, &stop));
            let result = (|| {
                let (mut meter, mut sent, start) = (CpuMeter::new(), 0u64, Instant::now());
                while start.elapsed() < duration {
                    while let Some(used) = self.tx.pop_used()? {
                        free.push(used.id);
                    }
                    let mut posted = 0u64;
                    while let Some(head) = free.pop() {
                        self.tx.make_available(head)?;
                        posted += 1;
                        if posted as usize == TX_BATCH {
                            break;
                        }
                    }
                    self.tx.publish()?;
                    self.tx_kick
                        .write(1)
                        .map_err(BenchError::io("kicking TX"))?;
                    meter.measure(|| self.run_loop(1000))?;
                    sent += posted;
                    wait_for(&received, sent.saturating_sub(TX_WINDOW));
                }
                let wall = start.elapsed();
                wait_for(&received, sent);
                let seen = received.load(Ordering::Acquire).min(sent);
                Ok(IoFigure {
                    ops: seen,
                    bytes: seen * eth.len() as u64,
                    wall,
                    cpu: meter.total(),
                    lost: sent - seen,
                })
            })();
            stop.store(true, Ordering::Release);
            result
        })
    }

    fn set_limits(&self, rx: RateLimiterConfig, tx: RateLimiterConfig) -> Result<(), BenchError> {
        self.net
            .lock()
            .map_err(|_| BenchError::Check("device lock poisoned".into()))?
            .update_rate_limiters(
                &RateLimiterUpdate::replace_with(&rx),
                &RateLimiterUpdate::replace_with(&tx),
            )
            .map_err(|e| BenchError::Setup {
                what: "virtio-net rate limiter",
                why: e.to_string(),
            })?;
        Ok(())
    }

    fn tx_frames(&self) -> Result<u64, BenchError> {
        Ok(self
            .net
            .lock()
            .map_err(|_| BenchError::Check("device lock poisoned".into()))?
            .stats()
            .tx_frames)
    }

    /// `path` with that direction's rate limiter set to `limit`. The first `duration / 4` drains
    /// the limiter's initial full bucket and is not measured. `bytes` counts what the limiter
    /// counts: frames with their virtio-net header.
    pub fn run_limited(
        &mut self,
        path: NetPath,
        payload: usize,
        limit: RateLimiterConfig,
        duration: Duration,
    ) -> Result<IoFigure, BenchError> {
        let warm_up = duration / 4;
        let none = RateLimiterConfig::default();
        let figure = match path {
            NetPath::Rx => {
                self.set_limits(limit, none)?;
                self.run_rx(payload, warm_up)?;
                self.run_rx(payload, duration)
            }
            NetPath::Tx => {
                self.set_limits(none, limit)?;
                self.run_tx_limited(payload, warm_up, duration)
            }
        };
        self.set_limits(none, none)?;
        // Whatever the limiter held back goes now, so the next row starts with empty rings.
        for _ in 0..100 {
            while let Some(used) = self.tx.pop_used()? {
                let _ = used;
            }
            if self.tx.in_flight() == 0 {
                break;
            }
            self.run_loop(20)?;
        }
        let figure = figure?;
        let wire = (VNET_HDR_LEN + frame_len(payload)) as u64;
        Ok(IoFigure {
            bytes: figure.ops * wire,
            ..figure
        })
    }

    /// Guest → TAP under a TX limit: the driver keeps the ring full, the device sends what the
    /// limiter allows (its own frame counter is the measure), woken by the limiter's timer.
    fn run_tx_limited(
        &mut self,
        payload: usize,
        warm_up: Duration,
        duration: Duration,
    ) -> Result<IoFigure, BenchError> {
        let guest = UdpEndpoint {
            mac: GUEST_MAC,
            ip: GUEST_IP,
            port: GUEST_PORT,
        };
        let host = UdpEndpoint {
            mac: HOST_MAC,
            ip: HOST_IP,
            port: SINK_PORT,
        };
        let eth = udp_frame(guest, host, payload).ok_or_else(|| BenchError::Setup {
            what: "TX frame",
            why: format!("UDP payload of {payload} bytes"),
        })?;
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(&eth);
        for i in 0..QUEUE_SIZE {
            let addr = TX_BUFS + u64::from(i) * BUF_LEN;
            self.mem
                .write_slice(&frame, GuestAddress(addr))
                .map_err(BenchError::memory)?;
            self.tx.set_desc(
                i,
                DescSpec {
                    addr,
                    len: frame.len() as u32,
                    flags: 0,
                    next: 0,
                },
            )?;
        }
        // The previous row's chains are all used: reap them so every head is free once.
        while self.tx.pop_used()?.is_some() {}
        let mut free: Vec<u16> = (0..QUEUE_SIZE).rev().collect();
        let mut pass = |bench: &mut Self, meter: &mut CpuMeter| -> Result<(), BenchError> {
            while let Some(used) = bench.tx.pop_used()? {
                free.push(used.id);
            }
            let mut posted = 0;
            while bench.tx.in_flight() < QUEUE_SIZE {
                let Some(head) = free.pop() else { break };
                bench.tx.make_available(head)?;
                posted += 1;
            }
            if posted > 0 {
                bench.tx.publish()?;
                bench
                    .tx_kick
                    .write(1)
                    .map_err(BenchError::io("kicking TX"))?;
            }
            // Throttled, this sleeps until the limiter's timer fires.
            meter.measure(|| bench.run_loop(1000))?;
            Ok(())
        };
        let start = Instant::now();
        while start.elapsed() < warm_up {
            pass(self, &mut CpuMeter::new())?;
        }
        let (mut meter, before, start) = (CpuMeter::new(), self.tx_frames()?, Instant::now());
        while start.elapsed() < duration {
            pass(self, &mut meter)?;
        }
        let sent = self.tx_frames()? - before;
        Ok(IoFigure {
            ops: sent,
            bytes: sent * eth.len() as u64,
            wall: start.elapsed(),
            cpu: meter.total(),
            lost: 0,
        })
    }

    /// Namespace → TAP → guest RX buffers.
    pub fn run_rx(&mut self, payload: usize, duration: Duration) -> Result<IoFigure, BenchError> {
        let want_len = (VNET_HDR_LEN + frame_len(payload)) as u32;
        let flags = VRING_DESC_F_WRITE as u16;
        for i in 0..QUEUE_SIZE {
            let addr = RX_BUFS + u64::from(i) * BUF_LEN;
            self.rx.set_desc(
                i,
                DescSpec {
                    addr,
                    len: BUF_LEN as u32,
                    flags,
                    next: 0,
                },
            )?;
        }
        // Post every buffer the device has not already got.
        for i in 0..QUEUE_SIZE.saturating_sub(self.rx.in_flight()) {
            self.rx.make_available(i)?;
        }
        self.rx.publish()?;
        self.rx_kick
            .write(1)
            .map_err(BenchError::io("kicking RX"))?;
        let source = self
            .source
            .try_clone()
            .map_err(BenchError::io("duplicating the source socket"))?;
        let stop = AtomicBool::new(false);
        let data = vec![0xcdu8; payload];

        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Acquire) {
                    // ENOBUFS and the like just mean the TAP is full: keep offering.
                    let _ = source.send(&data);
                }
            });
            let result = (|| {
                let (mut meter, mut frames, start) = (CpuMeter::new(), 0u64, Instant::now());
                while start.elapsed() < duration {
                    meter.measure(|| self.run_loop(50))?;
                    frames += self.recycle_rx(want_len)?;
                }
                Ok(IoFigure {
                    ops: frames,
                    bytes: frames * frame_len(payload) as u64,
                    wall: start.elapsed(),
                    cpu: meter.total(),
                    lost: 0,
                })
            })();
            stop.store(true, Ordering::Release);
            result
        })
        .and_then(|figure| {
            // Drain what the sender queued so the next row starts clean.
            while self.run_loop(20)? > 0 {
                self.recycle_rx(want_len)?;
            }
            Ok(figure)
        })
    }

    /// Reposts every used RX buffer; returns how many held a frame of `want_len` bytes.
    fn recycle_rx(&mut self, want_len: u32) -> Result<u64, BenchError> {
        let (mut frames, mut reposted) = (0u64, 0u32);
        while let Some(used) = self.rx.pop_used()? {
            if used.len == want_len {
                frames += 1;
            }
            self.rx.make_available(used.id)?;
            reposted += 1;
        }
        if reposted > 0 {
            self.rx.publish()?;
            self.rx_kick
                .write(1)
                .map_err(BenchError::io("kicking RX"))?;
        }
        Ok(frames)
    }
}

fn disable_ipv6() {
    for conf in ["all", "default"] {
        // Absent when the host has no IPv6: nothing to disable then.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
    }
}

fn open_sockets() -> Result<(UdpSocket, UdpSocket), BenchError> {
    let sink = UdpSocket::bind(SocketAddrV4::new(HOST_IP, SINK_PORT))
        .map_err(BenchError::io("binding the TX sink socket"))?;
    // Room for the whole TX window even of small datagrams (root may exceed rmem_max).
    set_rcvbuf_force(&sink, 16 << 20)?;
    let source = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0))
        .map_err(BenchError::io("binding the RX source socket"))?;
    source
        .connect(SocketAddrV4::new(GUEST_IP, GUEST_PORT))
        .map_err(BenchError::io("connecting the RX source socket"))?;
    Ok((sink, source))
}

fn set_rcvbuf_force(socket: &UdpSocket, bytes: libc::c_int) -> Result<(), BenchError> {
    // SAFETY: SO_RCVBUFFORCE reads one c_int through the pointer, valid for the call; the fd
    // is a socket we own.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(BenchError::io("SO_RCVBUFFORCE")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Counts datagrams of `payload` bytes until `stop`.
fn count_datagrams(sink: &UdpSocket, payload: usize, received: &AtomicU64, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Acquire) {
        match sink.recv(&mut buf) {
            Ok(n) if n == payload => {
                received.fetch_add(1, Ordering::Release);
            }
            // Timeouts let us notice `stop`; stray datagrams are not ours to count.
            _ => {}
        }
    }
}

/// Waits until `counter` reaches `target`, giving up after `SINK_PATIENCE` without progress.
fn wait_for(counter: &AtomicU64, target: u64) {
    let mut last = counter.load(Ordering::Acquire);
    let mut since = Instant::now();
    while last < target {
        std::thread::yield_now();
        let now = counter.load(Ordering::Acquire);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() > SINK_PATIENCE {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root (namespace + TAP); reports and returns otherwise.
    #[test]
    fn frames_cross_a_real_tap_both_ways_and_the_namespace_is_removed() {
        if !crate::netns::is_root() {
            eprintln!("skipping TAP benchmark test: needs root");
            return;
        }
        let mut bench = TapBench::setup().unwrap();
        let ns = bench.namespace().to_string();
        let short = Duration::from_millis(100);
        let tx = bench.run_tx(SMALL_PAYLOAD, short).unwrap();
        assert!(tx.ops > 0, "{tx:?}");
        assert_eq!(tx.bytes, tx.ops * frame_len(SMALL_PAYLOAD) as u64);
        assert_eq!(tx.lost, 0, "{tx:?}");
        let rx = bench.run_rx(MTU_PAYLOAD, short).unwrap();
        assert!(rx.ops > 0, "{rx:?}");
        assert!(rx.cpu.total() > Duration::ZERO);
        drop(bench);
        assert!(!std::path::Path::new(&format!("/run/netns/{ns}")).exists());
    }
}
