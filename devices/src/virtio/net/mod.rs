//! virtio-net on a host TAP interface: one RX and one TX queue, checksum and TSO offloads,
//! virtio_net_hdr_v1 passed straight through to the TAP (IFF_VNET_HDR).
//!
//! `rxtx` moves frames (pure, generic over the TAP), `tap` opens the interface, and this module
//! is the glue with the transport and the event loop. The TAP fd is registered edge-triggered:
//! RX reads until the TAP is drained or the guest has no buffers; in the latter case the frame
//! in hand is kept and reading resumes on the guest's next RX queue notification.
//!
//! RX and TX each have a rate limiter (`crate::rate_limiter`, as in Firecracker). A throttled
//! direction ignores its queue notifications (and, for RX, the TAP) until its limiter's timer
//! fires: an RX frame in hand stays pending, a TX chain stays in the ring.

mod mmds_tap;
mod persist;
pub mod rxtx;
pub mod tap;

pub use persist::{NetConstructorArgs, NetState};
pub use rxtx::{
    process_rx, process_rx_limited, process_tx, process_tx_limited, RxBuffer, RxRun, TapIo, TxRun,
    MAX_FRAME_LEN,
};
pub use tap::{offload_flags, Tap, TapError, TapOffload};

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::epoll::EventSet;

use crate::mmds::{MmdsNetConfig, Responder};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterUpdate};
use crate::virtio::device_events::{DeviceEvents, ACTIVATE_TOKEN, DEVICE_TOKEN_BASE};
use crate::virtio::{ActivateError, ActivationContext, VirtioDevice, VirtioInterrupt};
use crate::GuestMemory;
use mmds_tap::MmdsTap;
use vmm_metrics::{MmdsMetrics, NetMetrics};

/// Size of struct virtio_net_hdr_v1 (virtio 1.x, also without MRG_RXBUF).
pub const VNET_HDR_LEN: usize = 12;
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const TAP_TOKEN: u32 = DEVICE_TOKEN_BASE;
const RX_LIMITER_TOKEN: u32 = DEVICE_TOKEN_BASE + 1;
const TX_LIMITER_TOKEN: u32 = DEVICE_TOKEN_BASE + 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Host TAP interface name; created if it does not exist. With `fd`, the name the TAP
    /// must have (or empty: whatever it is).
    pub tap: String,
    /// An already-open TAP descriptor (`--net fd=N`) the device uses (a duplicate of) instead of
    /// opening `tap`: how a jail hands a TAP to a VMM that cannot open one.
    pub fd: Option<std::os::fd::RawFd>,
    /// Guest MAC; a random locally administered one if None.
    pub mac: Option<[u8; 6]>,
    /// Limits on frames delivered to the guest (the default limits nothing).
    pub rx_rate_limiter: RateLimiterConfig,
    /// Limits on frames the guest sends.
    pub tx_rate_limiter: RateLimiterConfig,
    /// Answer the MMDS on this interface (its frames then never reach the TAP).
    pub mmds: Option<MmdsNetConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("generating a MAC address: {0}")]
    Random(#[source] std::io::Error),
    #[error("creating virtio-net eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("virtio-net rate limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
}

/// Counters for diagnostics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_dropped: u64,
}

/// What the device needs from its backend: frame I/O, an fd to poll, offload control.
pub trait NetBackend: TapIo + TapOffload + AsRawFd + Send {}
impl<T: TapIo + TapOffload + AsRawFd + Send> NetBackend for T {}

struct Active {
    mem: GuestMemory,
    rx_queue: Queue,
    tx_queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

pub struct Net<B: NetBackend = Tap> {
    backend: B,
    mac: [u8; 6],
    features: u64,
    events: DeviceEvents,
    active: Option<Active>,
    rx: RxBuffer,
    tx_scratch: Vec<u8>,
    stats: NetStats,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    metrics: Option<NetMetrics>,
    /// The MMDS responder, when this interface serves it.
    mmds: Option<Responder>,
    /// The VM's `mmds` counters, kept for a responder set up after them.
    mmds_metrics: Option<MmdsMetrics>,
}

impl Net<Tap> {
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let tap = match config.fd {
            Some(fd) => Tap::from_fd(fd, &config.tap)?,
            None => Tap::open(&config.tap)?,
        };
        let mac = match config.mac {
            Some(mac) => mac,
            None => random_mac().map_err(NetError::Random)?,
        };
        let mut net = Self::with_backend(tap, mac)?;
        net.rx_limiter = RateLimiter::new(&config.rx_rate_limiter)?;
        net.tx_limiter = RateLimiter::new(&config.tx_rate_limiter)?;
        net.set_mmds(config.mmds);
        Ok(net)
    }
}

impl<B: NetBackend> Net<B> {
    /// A device over any backend (tests use a socketpair standing in for the TAP).
    pub fn with_backend(backend: B, mac: [u8; 6]) -> Result<Self, NetError> {
        let features = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | (1u64 << bit));
        Ok(Self {
            backend,
            mac,
            features,
            events: DeviceEvents::new().map_err(NetError::EventFd)?,
            active: None,
            rx: RxBuffer::default(),
            tx_scratch: Vec::with_capacity(MAX_FRAME_LEN),
            stats: NetStats::default(),
            rx_limiter: RateLimiter::unlimited()?,
            tx_limiter: RateLimiter::unlimited()?,
            metrics: None,
            mmds: None,
            mmds_metrics: None,
        })
    }

    /// Serves (or stops serving) the MMDS on this interface.
    pub fn set_mmds(&mut self, config: Option<MmdsNetConfig>) {
        self.mmds = config.map(|c| {
            let mut responder = Responder::new(c.ipv4, c.mmds);
            if let Some(m) = &self.mmds_metrics {
                responder.set_metrics(m.clone());
            }
            responder
        });
    }

    /// The MMDS address this interface answers at, if any.
    pub fn mmds_ipv4(&self) -> Option<std::net::Ipv4Addr> {
        self.mmds.as_ref().map(Responder::ip)
    }

    /// Counts this device's traffic in `metrics` from now on (handed over by the device
    /// manager right after building the device).
    pub fn set_metrics(&mut self, metrics: NetMetrics) {
        self.metrics = Some(metrics);
    }

    /// Counts the MMDS traffic of this interface in the VM's `mmds` counters, whether it serves
    /// the MMDS already (new or restored device) or later.
    pub fn set_mmds_metrics(&mut self, metrics: MmdsMetrics) {
        if let Some(responder) = &mut self.mmds {
            responder.set_metrics(metrics.clone());
        }
        self.mmds_metrics = Some(metrics);
    }

    /// Changes the RX and TX rate limiters (on the event-loop thread, or with the loop parked);
    /// returns the configurations now in force. A throttled direction is re-evaluated at once.
    pub fn update_rate_limiters(
        &mut self,
        rx: &RateLimiterUpdate,
        tx: &RateLimiterUpdate,
    ) -> Result<(RateLimiterConfig, RateLimiterConfig), RateLimiterError> {
        self.rx_limiter.update(rx)?;
        self.tx_limiter.update(tx)?;
        Ok((self.rx_limiter.config(), self.tx_limiter.config()))
    }

    pub fn rx_rate_limiter(&self) -> &RateLimiter {
        &self.rx_limiter
    }

    pub fn tx_rate_limiter(&self) -> &RateLimiter {
        &self.tx_limiter
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        // A broken ring stays unprocessed until the driver resets the device.
        if active.interrupt.needs_reset() {
            return;
        }
        let limiter = self.rx_limiter.is_enabled().then_some(&mut self.rx_limiter);
        let mut io = MmdsTap {
            backend: &mut self.backend,
            responder: self.mmds.as_mut(),
        };
        match process_rx_limited(
            &mut active.rx_queue,
            &active.mem,
            &mut io,
            &mut self.rx,
            limiter,
        ) {
            Ok(run) => {
                self.stats.rx_frames += u64::from(run.delivered);
                self.stats.rx_dropped += u64::from(run.dropped);
                if let Some(m) = &self.metrics {
                    m.rx_packets_count.inc_by(u64::from(run.delivered));
                    m.rx_bytes_count.inc_by(run.bytes);
                    m.rx_dropped.inc_by(u64::from(run.dropped));
                    m.tap_read_fails.inc_by(u64::from(run.tap_errors));
                    if run.throttled {
                        m.rx_rate_limiter_throttled.inc();
                    }
                }
                if run.notify {
                    signal(&active.interrupt);
                }
            }
            Err(e) => {
                signal(&active.interrupt);
                active.interrupt.queue_fault("virtio-net", 0, &e);
            }
        }
    }

    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        // A broken ring stays unprocessed until the driver resets the device.
        if active.interrupt.needs_reset() {
            return;
        }
        let limiter = self.tx_limiter.is_enabled().then_some(&mut self.tx_limiter);
        let mut io = MmdsTap {
            backend: &mut self.backend,
            responder: self.mmds.as_mut(),
        };
        match process_tx_limited(
            &mut active.tx_queue,
            &active.mem,
            &mut io,
            &mut self.tx_scratch,
            limiter,
        ) {
            Ok(run) => {
                self.stats.tx_frames += u64::from(run.sent);
                self.stats.tx_dropped += u64::from(run.dropped);
                if let Some(m) = &self.metrics {
                    m.tx_packets_count.inc_by(u64::from(run.sent));
                    m.tx_bytes_count.inc_by(run.bytes);
                    m.tx_dropped.inc_by(u64::from(run.dropped));
                    m.tap_write_fails.inc_by(u64::from(run.tap_errors));
                    if run.throttled {
                        m.tx_rate_limiter_throttled.inc();
                    }
                }
                if run.notify {
                    signal(&active.interrupt);
                }
            }
            Err(e) => {
                signal(&active.interrupt);
                active.interrupt.queue_fault("virtio-net", 1, &e);
            }
        }
        // The MMDS answered: its frames wait in the responder for the RX queue.
        if self.mmds.as_ref().is_some_and(Responder::has_frames) && !self.rx_limiter.is_blocked() {
            self.process_rx();
        }
    }

    fn config_space(&self) -> [u8; 10] {
        let mut cfg = [0u8; 10];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        // max_virtqueue_pairs: meaningful only with VIRTIO_NET_F_MQ; 1 is the truth anyway.
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg
    }
}

fn signal(interrupt: &VirtioInterrupt) {
    if let Err(e) = interrupt.signal_used_queue() {
        tracing::error!("virtio-net: raising interrupt: {e}");
    }
}

/// A random unicast, locally administered MAC.
fn random_mac() -> std::io::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most `mac.len()` bytes into `mac`, which is valid for writes.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if usize::try_from(n).ok() != Some(mac.len()) {
        return Err(std::io::Error::last_os_error());
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Ok(mac)
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let cfg = self.config_space();
        let Some(src) = usize::try_from(offset).ok().and_then(|o| cfg.get(o..)) else {
            return;
        };
        for (dst, src) in data.iter_mut().zip(src) {
            *dst = *src;
        }
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = ctx.queues.len();
        let mut queues = ctx.queues.into_iter();
        let (Some(rx_queue), Some(tx_queue), None) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        self.backend
            .set_offload(offload_flags(ctx.acked_features))
            .map_err(|e| ActivateError::Backend(format!("setting TAP offloads: {e}")))?;
        self.events.activate(ctx.queue_events)?;
        self.active = Some(Active {
            mem: ctx.mem,
            rx_queue,
            tx_queue,
            interrupt: ctx.interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        // A frame read for the old driver instance may not suit the next one's features.
        self.rx.clear();
        if let Err(e) = self.backend.set_offload(0) {
            tracing::warn!("virtio-net: clearing TAP offloads on reset: {e}");
        }
        self.events.reset();
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.rx_queue.state(), a.tx_queue.state()])
            .unwrap_or_default()
    }
}

impl<B: NetBackend> MutEventSubscriber for Net<B> {
    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops);
        // Edge-triggered: RX stops reading while the guest has no buffers, and a level-
        // triggered fd would then wake the loop continuously.
        let tap = Events::with_data(
            &self.backend,
            TAP_TOKEN,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        if let Err(e) = ops.add(tap) {
            tracing::error!("virtio-net: registering the TAP fd: {e}");
        }
        for (limiter, token) in [
            (&self.rx_limiter, RX_LIMITER_TOKEN),
            (&self.tx_limiter, TX_LIMITER_TOKEN),
        ] {
            if let Err(e) = ops.add(Events::with_data(limiter, token, EventSet::IN)) {
                tracing::error!("virtio-net: registering a rate limiter's timer: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == ACTIVATE_TOKEN {
            // Frames and TX requests may have queued up before we listened.
            if self.events.sync(ops) {
                self.process_tx();
                self.process_rx();
            }
        } else if token == TAP_TOKEN {
            // A throttled RX reads the TAP again when its timer fires (the fd is edge-triggered,
            // so nothing is lost by not reading now).
            if !self.rx_limiter.is_blocked() {
                self.process_rx();
            }
        } else if DeviceEvents::is_queue_token(token) {
            match self.events.take_queue_event(events.fd()) {
                // New RX buffers: resume a blocked RX.
                Some(RX_QUEUE) if !self.rx_limiter.is_blocked() => self.process_rx(),
                Some(TX_QUEUE) if !self.tx_limiter.is_blocked() => self.process_tx(),
                _ => {}
            }
        } else if token == RX_LIMITER_TOKEN {
            self.rx_limiter.event_handler();
            self.process_rx();
        } else if token == TX_LIMITER_TOKEN {
            self.tx_limiter.event_handler();
            self.process_tx();
        } else {
            tracing::warn!("virtio-net: unexpected event token {token}");
        }
    }
}

#[cfg(test)]
mod tests;
