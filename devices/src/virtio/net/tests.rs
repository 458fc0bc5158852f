use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::interrupt::CountingLine;

const MEM_SIZE: usize = 0x40_0000;
const BUFS: u64 = 0x10_0000;

fn mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Driver side of a split queue with its own (non-overlapping) ring layout.
struct Driver {
    desc_table: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
        mem.write_slice(&vec![0u8; 0x3000], GuestAddress(base))
            .unwrap();
        Self {
            desc_table: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_desc_table_address(Some(self.desc_table as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Adds a chain of `(addr, len, writable)` buffers; returns its head index.
    fn add(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = (idx + 1) % self.size;
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            mem.write_obj(d, GuestAddress(self.desc_table + 16 * u64::from(idx)))
                .unwrap();
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// (id, len) of used ring entry `i`.
    fn used_elem(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn avail_event(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used + 4 + 8 * u64::from(self.size)))
            .unwrap()
    }
}

#[derive(Default)]
struct FakeTap {
    incoming: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
    fail_writes: bool,
}

impl TapIo for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.incoming.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        if self.fail_writes {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.sent.push(frame.to_vec());
        Ok(frame.len())
    }
}

fn frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0] = VIRTIO_NET_HDR_F_DATA_VALID as u8;
    for (i, b) in f.iter_mut().enumerate().skip(VNET_HDR_LEN) {
        *b = tag.wrapping_add(i as u8);
    }
    f
}

fn guest_bytes(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
    out
}

#[test]
fn rx_delivers_frames_in_order_across_descriptors() {
    let mem = mem();
    let mut drv = Driver::new(&mem, 0, 16);
    let mut q = drv.queue();
    let mut tap = FakeTap::default();
    tap.incoming.extend([frame(1, 100), frame(2, 1500)]);
    // Header in its own descriptor, payload in a second one (as Linux does without
    // ANY_LAYOUT assumptions), and a single big buffer.
    drv.add(&mem, &[(BUFS, 12, true), (BUFS + 0x1000, 2000, true)]);
    drv.add(&mem, &[(BUFS + 0x2000, 1600, true)]);
    let mut rx = RxBuffer::default();
    let run = process_rx(&mut q, &mem, &mut tap, &mut rx).unwrap();
    assert_eq!(run.delivered, 2);
    assert!(run.notify && !run.blocked);
    assert_eq!(drv.used_idx(&mem), 2);
    assert_eq!(drv.used_elem(&mem, 0), (0, 100));
    assert_eq!(drv.used_elem(&mem, 1), (2, 1500));
    let f1 = frame(1, 100);
    assert_eq!(guest_bytes(&mem, BUFS, 12), f1[..12]);
    assert_eq!(guest_bytes(&mem, BUFS + 0x1000, 88), f1[12..]);
    assert_eq!(guest_bytes(&mem, BUFS + 0x2000, 1500), frame(2, 1500));
}

#[test]
fn rx_without_buffers_keeps_the_frame_and_resumes_in_order() {
    let mem = mem();
    let mut drv = Driver::new(&mem, 0, 16);
    let mut q = drv.queue();
    q.set_event_idx(true);
    let mut tap = FakeTap::default();
    tap.incoming
        .extend([frame(1, 60), frame(2, 61), frame(3, 62)]);
    let mut rx = RxBuffer::default();

    drv.add(&mem, &[(BUFS, 2048, true)]);
    let run = process_rx(&mut q, &mem, &mut tap, &mut rx).unwrap();
    assert_eq!(run.delivered, 1);
    assert!(run.blocked);
    assert!(rx.has_pending(), "frame 2 is held, not dropped");
    assert_eq!(tap.incoming.len(), 1, "frame 3 is left in the TAP");
    // The driver is asked to kick when it adds the next buffer.
    assert_eq!(drv.avail_event(&mem), 1);

    // Nothing changes while the guest has no buffers.
    let run = process_rx(&mut q, &mem, &mut tap, &mut rx).unwrap();
    assert_eq!((run.delivered, run.blocked), (0, true));
    assert_eq!(tap.incoming.len(), 1);

    drv.add(&mem, &[(BUFS + 0x1000, 2048, true)]);
    drv.add(&mem, &[(BUFS + 0x2000, 2048, true)]);
    let run = process_rx(&mut q, &mem, &mut tap, &mut rx).unwrap();
    assert_eq!(run.delivered, 2);
    assert!(!run.blocked && !rx.has_pending());
    assert_eq!(drv.used_elem(&mem, 1).1, 61);
    assert_eq!(drv.used_elem(&mem, 2).1, 62);
    assert_eq!(guest_bytes(&mem, BUFS + 0x1000, 61), frame(2, 61));
    assert_eq!(guest_bytes(&mem, BUFS + 0x2000, 62), frame(3, 62));
}

#[test]
fn rx_drops_a_frame_too_big_for_the_buffer_and_reuses_the_buffer() {
    let mem = mem();
    let mut drv = Driver::new(&mem, 0, 16);
    let mut q = drv.queue();
    let mut tap = FakeTap::default();
    tap.incoming.extend([frame(1, 4000), frame(2, 100)]);
    drv.add(&mem, &[(BUFS, 1526, true)]);
    let mut rx = RxBuffer::default();
    let run = process_rx(&mut q, &mem, &mut tap, &mut rx).unwrap();
    assert_eq!((run.delivered, run.dropped), (1, 1));
    assert_eq!(drv.used_elem(&mem, 0), (0, 100));
    assert_eq!(guest_bytes(&mem, BUFS, 100), frame(2, 100));
}

#[test]
fn rx_returns_unusable_chains_empty_and_keeps_the_frame() {
    let mem = mem();
    let mut drv = Driver::new(&mem, 0, 16);
    let mut q = drv.queue();
    let mut tap = FakeTap::default();
    tap.incoming.push_back(frame(7, 80));
    drv.add(&mem, &[(BUFS, 2048, false)]); // device-readable only
    drv.add(&mem, &[(MEM_SIZE as u64 - 16, 2048, true)]); // outside guest memory
    drv.add(&mem, &[(BUFS, 2048, true)]);
    let mut rx = RxBuffer::default();
    let run = process_rx(&mut q, &mem, &mut tap, &mut rx).unwrap();
    assert_eq!((run.delivered, run.bad_chains), (1, 2));
    assert_eq!(drv.used_elem(&mem, 0).1, 0);
    assert_eq!(drv.used_elem(&mem, 1).1, 0);
    assert_eq!(drv.used_elem(&mem, 2), (2, 80));
    assert_eq!(guest_bytes(&mem, BUFS, 80), frame(7, 80));
}

#[test]
fn rx_with_a_bogus_avail_index_does_not_spin() {
    let mem = mem();
    let drv = Driver::new(&mem, 0, 16);
    let mut q = drv.queue();
    mem.write_obj(500u16, GuestAddress(drv.avail + 2)).unwrap();
    let mut tap = FakeTap::default();
    tap.incoming.push_back(frame(1, 60));
    let mut rx = RxBuffer::default();
    // A broken ring is an error (the device then needs a reset), the frame is kept.
    let err = process_rx(&mut q, &mem, &mut tap, &mut rx).unwrap_err();
    assert!(matches!(err, virtio_queue::Error::InvalidAvailRingIndex));
    assert!(rx.has_pending());
}

#[test]
fn tx_sends_every_chain_with_the_header_passed_through() {
    let mem = mem();
    let mut drv = Driver::new(&mem, 0, 16);
    let mut q = drv.queue();
    let f1 = frame(1, 1000);
    let f2 = frame(2, 64);
    mem.write_slice(&f1[..12], GuestAddress(BUFS)).unwrap();
    mem.write_slice(&f1[12..], GuestAddress(BUFS + 0x1000))
        .unwrap();
    mem.write_slice(&f2, GuestAddress(BUFS + 0x2000)).unwrap();
    drv.add(&mem, &[(BUFS, 12, false), (BUFS + 0x1000, 988, false)]);
    drv.add(&mem, &[(BUFS + 0x2000, 64, false)]);
    let mut tap = FakeTap::default();
    let run = process_tx(&mut q, &mem, &mut tap, &mut Vec::new()).unwrap();
    assert_eq!(
        run,
        TxRun {
            sent: 2,
            bytes: (f1.len() + f2.len()) as u64,
            dropped: 0,
            tap_errors: 0,
            throttled: false,
            notify: true
        }
    );
    assert_eq!(tap.sent, vec![f1, f2]);
    assert_eq!(drv.used_idx(&mem), 2);
    assert_eq!(drv.used_elem(&mem, 0), (0, 0));
    assert_eq!(drv.used_elem(&mem, 1), (2, 0));
}

#[test]
fn tx_drops_malformed_chains_but_returns_them() {
    let mem = mem();
    let mut drv = Driver::new(&mem, 0, 16);
    let mut q = drv.queue();
    drv.add(&mem, &[(BUFS, 11, false)]); // shorter than the header
    drv.add(&mem, &[(BUFS, 64, false), (BUFS, 64, true)]); // device-writable part
    drv.add(&mem, &[(MEM_SIZE as u64 - 8, 64, false)]); // outside memory
    drv.add(&mem, &[(BUFS, 60_000, false), (BUFS, 60_000, false)]); // oversized
    drv.add(&mem, &[(BUFS, u32::MAX, false)]);
    let mut tap = FakeTap::default();
    let run = process_tx(&mut q, &mem, &mut tap, &mut Vec::new()).unwrap();
    assert_eq!((run.sent, run.dropped), (0, 5));
    assert!(tap.sent.is_empty());
    assert_eq!(drv.used_idx(&mem), 5);
}

#[test]
fn tx_survives_tap_write_errors() {
    let mem = mem();
    let mut drv = Driver::new(&mem, 0, 16);
    let mut q = drv.queue();
    drv.add(&mem, &[(BUFS, 64, false)]);
    let mut tap = FakeTap {
        fail_writes: true,
        ..Default::default()
    };
    let run = process_tx(&mut q, &mem, &mut tap, &mut Vec::new()).unwrap();
    assert_eq!((run.sent, run.dropped), (0, 1));
    assert_eq!(drv.used_idx(&mem), 1);
}

#[test]
fn tx_respects_event_idx() {
    let mem = mem();
    let mut drv = Driver::new(&mem, 0, 16);
    let mut q = drv.queue();
    q.set_event_idx(true);
    // used_event = 3: interrupt only once the 4th chain is used.
    mem.write_obj(3u16, GuestAddress(drv.avail + 4 + 2 * 16))
        .unwrap();
    let mut tap = FakeTap::default();
    drv.add(&mem, &[(BUFS, 64, false)]);
    drv.add(&mem, &[(BUFS, 64, false)]);
    let run = process_tx(&mut q, &mem, &mut tap, &mut Vec::new()).unwrap();
    assert_eq!((run.sent, run.notify), (2, false));
    assert_eq!(drv.avail_event(&mem), 2);
    drv.add(&mem, &[(BUFS, 64, false)]);
    drv.add(&mem, &[(BUFS, 64, false)]);
    let run = process_tx(&mut q, &mem, &mut tap, &mut Vec::new()).unwrap();
    assert_eq!((run.sent, run.notify), (2, true));
}

/// A TAP stand-in for device tests: one end of a datagram socketpair (frame boundaries are
/// kept, the fd can be polled).
struct PairTap {
    sock: UnixDatagram,
    offload: AtomicU32,
    offload_calls: Mutex<Vec<u32>>,
}

impl PairTap {
    fn new() -> (Self, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (
            Self {
                sock: a,
                offload: AtomicU32::new(u32::MAX),
                offload_calls: Mutex::new(Vec::new()),
            },
            b,
        )
    }
}

impl TapIo for PairTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.sock.send(frame)
    }
}

impl TapOffload for PairTap {
    fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        self.offload.store(flags, Ordering::SeqCst);
        self.offload_calls.lock().unwrap().push(flags);
        Ok(())
    }
}

impl AsRawFd for PairTap {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

fn ctx(
    mem: &GuestMemory,
    queues: Vec<Queue>,
    features: u64,
) -> (
    ActivationContext,
    Arc<CountingLine>,
    Vec<vmm_sys_util::eventfd::EventFd>,
) {
    let line = Arc::new(CountingLine::default());
    let evts: Vec<_> = (0..queues.len())
        .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
        .collect();
    let ctx = ActivationContext {
        mem: mem.clone(),
        acked_features: features,
        queues,
        queue_events: evts.iter().map(|e| e.try_clone().unwrap()).collect(),
        interrupt: Arc::new(VirtioInterrupt::new(line.clone())),
    };
    (ctx, line, evts)
}

#[test]
fn config_space_has_mac_and_link_up() {
    let (tap, _peer) = PairTap::new();
    let net = Net::with_backend(tap, MAC).unwrap();
    let mut cfg = [0xffu8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg[..6], MAC);
    assert_eq!(
        u16::from_le_bytes([cfg[6], cfg[7]]),
        VIRTIO_NET_S_LINK_UP as u16
    );
    assert_eq!(cfg[10..], [0, 0], "past the end reads zero");
    let mut far = [0xffu8; 4];
    net.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 4]);
    let f = net.device_features();
    for bit in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
    assert_eq!(f & (1 << VIRTIO_NET_F_CTRL_VQ), 0);
}

#[test]
fn random_macs_are_unicast_and_locally_administered() {
    let a = random_mac().unwrap();
    let b = random_mac().unwrap();
    assert_ne!(a, b);
    for mac in [a, b] {
        assert_eq!(mac[0] & 0x01, 0, "unicast");
        assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
    }
}

#[test]
fn activation_sets_offloads_and_reset_clears_them() {
    let mem = mem();
    let (tap, _peer) = PairTap::new();
    let mut net = Net::with_backend(tap, MAC).unwrap();
    let (one, _, _) = ctx(&mem, vec![Queue::new(16).unwrap()], 0);
    assert!(matches!(
        net.activate(one),
        Err(ActivateError::QueueCount {
            expected: 2,
            got: 1
        })
    ));
    let acked = (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4);
    let (two, _, _) = ctx(
        &mem,
        vec![Queue::new(16).unwrap(), Queue::new(16).unwrap()],
        acked,
    );
    net.activate(two).unwrap();
    assert!(net.is_active());
    assert_eq!(
        net.backend().offload.load(Ordering::SeqCst),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4
    );
    assert_eq!(net.queue_states().len(), 2);
    net.reset();
    assert!(!net.is_active());
    assert_eq!(net.backend().offload.load(Ordering::SeqCst), 0);
}

#[test]
fn event_loop_moves_frames_both_ways() {
    use event_manager::{EventManager, SubscriberOps};
    let mem = mem();
    let (tap, peer) = PairTap::new();
    let metrics = vmm_metrics::VmMetrics::new("t").unwrap();
    let counts = metrics.net("eth0").unwrap();
    let mut device = Net::with_backend(tap, MAC).unwrap();
    device.set_metrics(counts.clone());
    let net = Arc::new(std::sync::Mutex::new(device));
    let mut manager = EventManager::<Arc<std::sync::Mutex<Net<PairTap>>>>::new().unwrap();
    manager.add_subscriber(net.clone());

    let mut rx_drv = Driver::new(&mem, 0, 16);
    let mut tx_drv = Driver::new(&mem, 0x8000, 16);
    // A frame that arrives before the driver is up waits in the TAP.
    peer.send(&frame(1, 90)).unwrap();
    let (c, line, evts) = ctx(&mem, vec![rx_drv.queue(), tx_drv.queue()], 0);
    net.lock().unwrap().activate(c).unwrap();
    manager.run_with_timeout(50).unwrap();
    assert_eq!(rx_drv.used_idx(&mem), 0, "no RX buffers yet");

    // Posting buffers and kicking the RX queue delivers it.
    rx_drv.add(&mem, &[(BUFS, 2048, true)]);
    rx_drv.add(&mem, &[(BUFS + 0x1000, 2048, true)]);
    evts[0].write(1).unwrap();
    manager.run_with_timeout(50).unwrap();
    assert_eq!(rx_drv.used_idx(&mem), 1);
    assert_eq!(guest_bytes(&mem, BUFS, 90), frame(1, 90));
    assert!(line.0.load(Ordering::SeqCst) >= 1);

    // A frame arriving later is delivered on the TAP's own readiness.
    peer.send(&frame(2, 70)).unwrap();
    manager.run_with_timeout(50).unwrap();
    assert_eq!(rx_drv.used_idx(&mem), 2);
    assert_eq!(guest_bytes(&mem, BUFS + 0x1000, 70), frame(2, 70));

    // TX: the guest queues a frame and kicks.
    mem.write_slice(&frame(3, 128), GuestAddress(BUFS + 0x4000))
        .unwrap();
    tx_drv.add(&mem, &[(BUFS + 0x4000, 128, false)]);
    evts[1].write(1).unwrap();
    manager.run_with_timeout(50).unwrap();
    let mut buf = [0u8; 256];
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(buf[..n], frame(3, 128));
    assert_eq!(tx_drv.used_idx(&mem), 1);
    let stats = net.lock().unwrap().stats();
    assert_eq!((stats.rx_frames, stats.tx_frames), (2, 1));
    // The same traffic in the device's counters, bytes included.
    assert_eq!(counts.rx_packets_count.get(), 2);
    assert_eq!(counts.rx_bytes_count.get(), 90 + 70);
    assert_eq!(counts.tx_packets_count.get(), 1);
    assert_eq!(counts.tx_bytes_count.get(), 128);
    assert_eq!(counts.tx_dropped.get() + counts.rx_dropped.get(), 0);
}

fn ops_limit(size: u64) -> crate::rate_limiter::RateLimiterConfig {
    crate::rate_limiter::RateLimiterConfig {
        bandwidth: None,
        // `size` frames, then one every 60 s / size: the test never waits for a refill.
        ops: Some(crate::rate_limiter::TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time: 60_000,
        }),
    }
}

#[test]
fn throttled_rx_and_tx_keep_their_frames_and_resume_on_their_timers() {
    use crate::rate_limiter::RateLimiterUpdate;
    use event_manager::{EventManager, SubscriberOps};
    let mem = mem();
    let (tap, peer) = PairTap::new();
    let mut device = Net::with_backend(tap, MAC).unwrap();
    device
        .update_rate_limiters(
            &RateLimiterUpdate::replace_with(&ops_limit(1)),
            &RateLimiterUpdate::replace_with(&ops_limit(1)),
        )
        .unwrap();
    let net = Arc::new(std::sync::Mutex::new(device));
    let mut manager = EventManager::<Arc<std::sync::Mutex<Net<PairTap>>>>::new().unwrap();
    manager.add_subscriber(net.clone());
    let mut rx_drv = Driver::new(&mem, 0, 16);
    let mut tx_drv = Driver::new(&mem, 0x8000, 16);
    for i in 0..3 {
        rx_drv.add(&mem, &[(BUFS + i * 0x1000, 2048, true)]);
    }
    let (c, _line, evts) = ctx(&mem, vec![rx_drv.queue(), tx_drv.queue()], 0);
    net.lock().unwrap().activate(c).unwrap();
    manager.run_with_timeout(50).unwrap();

    // RX: one frame passes, the second waits (in hand, not dropped), the third in the TAP.
    for tag in 1..=3 {
        peer.send(&frame(tag, 80)).unwrap();
    }
    manager.run_with_timeout(50).unwrap();
    assert_eq!(rx_drv.used_idx(&mem), 1);
    assert!(net.lock().unwrap().rx_rate_limiter().is_blocked());
    // TX: likewise, one of two chains.
    for i in 0..2u64 {
        let addr = BUFS + 0x4000 + i * 0x1000;
        mem.write_slice(&frame(10 + i as u8, 100), GuestAddress(addr))
            .unwrap();
        tx_drv.add(&mem, &[(addr, 100, false)]);
    }
    evts[1].write(1).unwrap();
    manager.run_with_timeout(50).unwrap();
    assert_eq!(tx_drv.used_idx(&mem), 1);
    assert!(net.lock().unwrap().tx_rate_limiter().is_blocked());
    // Kicks while throttled are consumed without effect; then the loop sleeps.
    evts[0].write(1).unwrap();
    evts[1].write(1).unwrap();
    while manager.run_with_timeout(0).unwrap() > 0 {}
    assert_eq!(manager.run_with_timeout(20).unwrap(), 0, "no busy polling");
    assert_eq!((rx_drv.used_idx(&mem), tx_drv.used_idx(&mem)), (1, 1));

    // Lifting both limits fires both timers: everything moves, in order.
    let off = RateLimiterUpdate::replace_with(&Default::default());
    net.lock()
        .unwrap()
        .update_rate_limiters(&off, &off)
        .unwrap();
    for _ in 0..4 {
        manager.run_with_timeout(100).unwrap();
    }
    assert_eq!((rx_drv.used_idx(&mem), tx_drv.used_idx(&mem)), (3, 2));
    for (i, tag) in (1..=3).enumerate() {
        assert_eq!(
            guest_bytes(&mem, BUFS + i as u64 * 0x1000, 80),
            frame(tag, 80)
        );
    }
    let mut buf = [0u8; 256];
    for tag in [10u8, 11] {
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(buf[..n], frame(tag, 100));
    }
    let stats = net.lock().unwrap().stats();
    assert_eq!((stats.rx_frames, stats.rx_dropped), (3, 0));
}

/// An ARP request from `GUEST` for `target`, behind a zeroed virtio-net header.
fn arp_request_frame(target: [u8; 4]) -> Vec<u8> {
    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&[0x08, 0x06]);
    // Ethernet, IPv4, lengths 6 and 4, request.
    frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 169, 254, 0, 2]);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target);
    frame
}

#[test]
fn mmds_frames_are_answered_and_never_reach_the_tap() {
    use crate::mmds::{Responder, SharedMmds, DEFAULT_IPV4};
    let mut tap = FakeTap::default();
    let mut responder = Responder::new(DEFAULT_IPV4, SharedMmds::default());
    let mut io = super::mmds_tap::MmdsTap {
        backend: &mut tap,
        responder: Some(&mut responder),
    };
    let other = arp_request_frame([10, 0, 0, 1]);
    io.write_frame(&other).unwrap();
    io.write_frame(&arp_request_frame(DEFAULT_IPV4.octets()))
        .unwrap();
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let len = io.read_frame(&mut buf).unwrap();
    // The reply: a virtio-net header (num_buffers 1), then an ARP reply to the guest's MAC.
    assert_eq!(&buf[..VNET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(
        &buf[VNET_HDR_LEN..VNET_HDR_LEN + 6],
        &[0x02, 0, 0, 0, 0, 0x01]
    );
    assert_eq!(&buf[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14], &[0x08, 0x06]);
    assert_eq!(&buf[VNET_HDR_LEN + 20..VNET_HDR_LEN + 22], &[0, 2]);
    assert!(len >= VNET_HDR_LEN + 42);
    // Nothing else for the guest: the TAP (empty) answers.
    assert_eq!(
        io.read_frame(&mut buf).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    assert_eq!(
        tap.sent,
        vec![other],
        "only the other frame reached the TAP"
    );
}

#[test]
fn mmds_counters_reach_the_responder_whichever_is_set_first() {
    use crate::mmds::{MmdsNetConfig, SharedMmds, DEFAULT_IPV4};
    let metrics = vmm_metrics::VmMetrics::new("").unwrap();
    let config = || {
        Some(MmdsNetConfig {
            ipv4: DEFAULT_IPV4,
            mmds: SharedMmds::default(),
        })
    };
    // A new device gets its MMDS first; a restored one too (`Net::restore`), then the device
    // manager hands over the counters. Counters first: an MMDS configured later.
    let mut mmds_first = Net::with_backend(PairTap::new().0, MAC).unwrap();
    mmds_first.set_mmds(config());
    mmds_first.set_mmds_metrics(metrics.mmds().clone());
    let mut metrics_first = Net::with_backend(PairTap::new().0, MAC).unwrap();
    metrics_first.set_mmds_metrics(metrics.mmds().clone());
    metrics_first.set_mmds(config());
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    for (i, net) in [&mut mmds_first, &mut metrics_first]
        .into_iter()
        .enumerate()
    {
        let mut tap = FakeTap::default();
        let mut io = super::mmds_tap::MmdsTap {
            backend: &mut tap,
            responder: net.mmds.as_mut(),
        };
        io.write_frame(&arp_request_frame(DEFAULT_IPV4.octets()))
            .unwrap();
        let len = io.read_frame(&mut buf).unwrap();
        let m = metrics.mmds();
        assert_eq!(m.rx_accepted.get(), i as u64 + 1);
        assert_eq!(m.tx_frames.get(), i as u64 + 1);
        // One VM-wide set: both interfaces add up.
        assert_eq!(
            m.tx_bytes.get(),
            (i as u64 + 1) * (len - VNET_HDR_LEN) as u64
        );
    }
}
