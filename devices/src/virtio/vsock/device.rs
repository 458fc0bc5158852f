//! The virtio-vsock device: virtqueues and event-loop glue around the muxer (userspace
//! datapath) or the vhost-kernel worker. Queue work happens on the event-loop thread; the
//! transport only hands over queues (activate) and takes them back (reset), see
//! `virtio/mod.rs` for the threading contract.

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::inproc::unsupported_handle;
use super::backend::{InProcessBackend, UdsBackend, VsockBackend, VsockHandle};
use super::config::{vhost_usable, ConfigError, Datapath, VsockConfig, VHOST_VSOCK_DEV};
use super::defs::*;
use super::header::{Header, HEADER_SIZE};
use super::muxer::Muxer;
use super::vhost_dp::VhostDatapath;
use crate::virtio::queue_check::pop_checked;
use crate::virtio::{ActivateError, ActivationContext, VirtioDevice, VirtioInterrupt};
use crate::GuestMemory;
use vmm_metrics::VsockMetrics;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Event tokens (`Events::data`).
const TOKEN_CONTROL: u32 = 0;
const TOKEN_RXQ: u32 = 1;
const TOKEN_TXQ: u32 = 2;
const TOKEN_EVQ: u32 = 3;
const TOKEN_MUXER: u32 = 4;
const TOKEN_VHOST_CALL: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("vsock unix-socket backend: {0}")]
    Uds(#[from] super::backend::uds::UdsError),
    #[error("vsock setup: {0}")]
    Io(#[from] io::Error),
}

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    vhost: Option<VhostDatapath>,
    /// The event loop registered this activation's fds.
    registered: bool,
}

/// Fds currently registered with the event manager (own clones, so removal always works
/// even after the transport dropped its copies).
#[derive(Default)]
struct Registration {
    fds: Vec<(EventFd, u32)>,
    muxer: bool,
}

/// The virtio-vsock device. Its saved state and `Persist` implementation are in `persist.rs`.
pub struct Vsock {
    pub(super) config: VsockConfig,
    pub(super) datapath: Datapath,
    pub(super) avail_features: u64,
    pub(super) acked_features: u64,
    queue_sizes: [u16; NUM_QUEUES],
    /// Tells the event loop that activation or reset happened.
    control_evt: EventFd,
    pub(super) muxer: Option<Muxer>,
    handle: VsockHandle,
    active: Option<Active>,
    registration: Registration,
    pub(super) pending_transport_reset: bool,
    /// A transport reset was delivered and the guest has not yet kicked the event queue (which
    /// its driver does after handling the event). Until then nothing goes to the RX queue: the
    /// guest resets every connected socket when it handles the event, so a connection it
    /// accepted before that would be reset too (on the guest side only, leaving the host end
    /// hanging).
    awaiting_reset_ack: bool,
    rx_scratch: Vec<u8>,
    tx_scratch: Vec<u8>,
    metrics: Option<VsockMetrics>,
}

impl Vsock {
    /// Probes `/dev/vhost-vsock` and builds the device on the selected datapath.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        let usable = vhost_usable(Path::new(VHOST_VSOCK_DEV));
        Self::with_vhost_probe(config, usable)
    }

    /// Like `new` with the probe result given (tests, or a VMM that probed already).
    pub fn with_vhost_probe(config: VsockConfig, vhost_usable: bool) -> Result<Self, VsockError> {
        let datapath = config.select_datapath(vhost_usable)?;
        tracing::info!(
            guest_cid = config.guest_cid,
            requested = ?config.backend,
            vhost_usable,
            ?datapath,
            "vsock: datapath selected"
        );
        let (muxer, handle) = match datapath {
            Datapath::Userspace => {
                let inproc = InProcessBackend::new()?;
                let handle = inproc.handle();
                let mut backends: Vec<Box<dyn VsockBackend>> = vec![Box::new(inproc)];
                if let Some(path) = &config.uds_path {
                    backends.push(Box::new(UdsBackend::bind(path)?));
                }
                (Some(Muxer::new(config.guest_cid, backends)?), handle)
            }
            Datapath::Vhost => (None, unsupported_handle()?),
        };
        Ok(Self {
            config,
            datapath,
            avail_features: VIRTIO_F_VERSION_1,
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            control_evt: EventFd::new(EFD_NONBLOCK)?,
            muxer,
            handle,
            active: None,
            registration: Registration::default(),
            pending_transport_reset: false,
            awaiting_reset_ack: false,
            rx_scratch: vec![0; MAX_PKT_DATA as usize],
            tx_scratch: vec![0; MAX_PKT_DATA as usize],
            metrics: None,
        })
    }

    /// Counts this device's packets and connections in `metrics` from now on (the userspace
    /// datapath only: vhost moves packets in the kernel).
    pub fn set_metrics(&mut self, metrics: VsockMetrics) {
        if let Some(muxer) = self.muxer.as_mut() {
            muxer.set_metrics(metrics.clone());
        }
        self.metrics = Some(metrics);
    }

    pub fn guest_cid(&self) -> u64 {
        self.config.guest_cid
    }

    pub fn datapath(&self) -> Datapath {
        self.datapath
    }

    /// In-process connections for library users (fails with `Unsupported` on vhost).
    pub fn handle(&self) -> VsockHandle {
        self.handle.clone()
    }

    /// Live userspace connections (0 on vhost).
    pub fn connection_count(&self) -> usize {
        self.muxer.as_ref().map_or(0, Muxer::connection_count)
    }

    /// The fd the event loop watches for host-side work (userspace datapath only): readable
    /// when `handle_host_events` has something to do. Benchmarks wait on it like the loop does.
    pub fn host_events_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.muxer.as_ref().map(|m| m.as_raw_fd())
    }

    /// Closes every connection and queues VIRTIO_VSOCK_EVENT_TRANSPORT_RESET for the guest
    /// (delivered now if the device is active and the guest posted an event buffer).
    pub fn reset_all_connections(&mut self) {
        if let Some(m) = &mut self.muxer {
            m.reset_all_connections();
        }
        self.pending_transport_reset = true;
        self.deliver_events();
    }

    /// Guest kicked the TX queue: forward its packets, then send whatever became ready.
    pub fn handle_tx_kick(&mut self) {
        self.process_tx();
        self.process_rx();
    }

    /// Guest posted RX buffers.
    pub fn handle_rx_kick(&mut self) {
        self.process_rx();
    }

    /// Guest posted event buffers (after handling the events it was sent).
    pub fn handle_event_kick(&mut self) {
        if self.awaiting_reset_ack {
            tracing::debug!("vsock: the guest handled the transport reset");
            self.awaiting_reset_ack = false;
            if let Some(m) = &mut self.muxer {
                m.release_requests(Instant::now());
            }
            self.process_rx();
        }
        self.deliver_events();
    }

    /// The muxer's epoll fd is readable (host sockets, backends, timers).
    pub fn handle_host_events(&mut self) {
        if let Some(m) = &mut self.muxer {
            m.process_host_events(Instant::now());
        }
        self.process_rx();
    }

    fn process_tx(&mut self) {
        let (Some(active), Some(muxer)) = (self.active.as_mut(), self.muxer.as_mut()) else {
            return;
        };
        let mem = &active.mem;
        let Some(queue) = active.queues.get_mut(TXQ) else {
            return;
        };
        // A broken ring stays unprocessed until the driver resets the device.
        if active.interrupt.needs_reset() {
            return;
        }
        let mut used = false;
        loop {
            let chain = match pop_checked(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    active.interrupt.queue_fault("vsock", TXQ, &e);
                    break;
                }
            };
            let head = chain.head_index();
            let counted = match read_tx_packet(mem, chain, &mut self.tx_scratch) {
                Ok((hdr, len)) => match self.tx_scratch.get(..len) {
                    Some(data) => {
                        muxer.on_guest_packet(&hdr, data);
                        Some(len)
                    }
                    None => {
                        muxer.on_malformed_packet(&hdr);
                        None
                    }
                },
                // A readable header earns the connection an RST; garbage is just returned.
                Err(Some(hdr)) => {
                    muxer.on_malformed_packet(&hdr);
                    None
                }
                Err(None) => None,
            };
            if let Some(m) = &self.metrics {
                match counted {
                    Some(len) => {
                        m.tx_packets_count.inc();
                        m.tx_bytes_count.inc_by(len as u64);
                    }
                    None => m.packets_dropped.inc(),
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::warn!("vsock: TX add_used: {e}");
            }
            used = true;
        }
        if used {
            signal(&active.interrupt);
        }
    }

    fn process_rx(&mut self) {
        if self.awaiting_reset_ack {
            return;
        }
        let (Some(active), Some(muxer)) = (self.active.as_mut(), self.muxer.as_mut()) else {
            return;
        };
        let mem = &active.mem;
        let Some(queue) = active.queues.get_mut(RXQ) else {
            return;
        };
        if active.interrupt.needs_reset() {
            return;
        }
        let mut used = false;
        while muxer.has_pending_rx() {
            let mut chain = match pop_checked(queue, mem) {
                Ok(Some(chain)) => chain,
                // Wait for the guest to post buffers (RX kick).
                Ok(None) => break,
                Err(e) => {
                    active.interrupt.queue_fault("vsock", RXQ, &e);
                    break;
                }
            };
            let head = chain.head_index();
            let used_len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => {
                    let cap = pkt
                        .data_slice()
                        .map_or(0, |s| s.len())
                        .min(MAX_PKT_DATA as usize);
                    let mut hdr = Header::default();
                    let Some(buf) = self.rx_scratch.get_mut(..cap) else {
                        queue.go_to_previous_position();
                        break;
                    };
                    let Some(n) = muxer.fill_rx_packet(&mut hdr, buf) else {
                        // Nothing to send after all: give the buffer back.
                        queue.go_to_previous_position();
                        break;
                    };
                    let data_ok = match (pkt.data_slice(), self.rx_scratch.get(..n)) {
                        (_, Some([])) => true,
                        (Some(dst), Some(src)) => dst.write_slice(src, 0).is_ok(),
                        _ => false,
                    };
                    if !data_ok || pkt.set_header_from_raw(&hdr.to_bytes()).is_err() {
                        tracing::warn!("vsock: RX buffer write failed; packet lost");
                        if let Some(m) = &self.metrics {
                            m.packets_dropped.inc();
                        }
                        0
                    } else {
                        if let Some(m) = &self.metrics {
                            m.rx_packets_count.inc();
                            m.rx_bytes_count.inc_by(n as u64);
                        }
                        (HEADER_SIZE + n) as u32
                    }
                }
                Err(e) => {
                    tracing::debug!("vsock: malformed RX chain: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, used_len) {
                tracing::warn!("vsock: RX add_used: {e}");
            }
            used = true;
        }
        if used {
            signal(&active.interrupt);
        }
    }

    fn deliver_events(&mut self) {
        if !self.pending_transport_reset {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let Some(queue) = active.queues.get_mut(EVQ) else {
            return;
        };
        if active.interrupt.needs_reset() {
            return;
        }
        loop {
            let chain = match pop_checked(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    active.interrupt.queue_fault("vsock", EVQ, &e);
                    break;
                }
            };
            let head = chain.head_index();
            let slot = chain
                .writable()
                .find(|d| d.len() as usize >= EVENT_SIZE)
                .map(|d| d.addr());
            let written =
                slot.is_some_and(|addr| mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), addr).is_ok());
            let len = if written { EVENT_SIZE as u32 } else { 0 };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("vsock: event queue add_used: {e}");
            }
            signal(&active.interrupt);
            if written {
                tracing::info!("vsock: transport reset delivered to the guest");
                self.pending_transport_reset = false;
                self.awaiting_reset_ack = true;
                if let Some(m) = &mut self.muxer {
                    m.hold_requests();
                }
                return;
            }
        }
    }

    /// Brings event-manager registrations in line with the activation state.
    fn sync_registration(&mut self, ops: &mut EventOps) {
        for (fd, token) in self.registration.fds.drain(..) {
            let _ = ops.remove(Events::with_data(&fd, token, EventSet::IN));
        }
        let muxer_fd = self.muxer.as_ref().map(|m| m.as_raw_fd());
        if self.registration.muxer {
            if let Some(fd) = muxer_fd {
                let _ = ops.remove(Events::with_data_raw(fd, TOKEN_MUXER, EventSet::IN));
            }
            self.registration.muxer = false;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut wanted: Vec<(io::Result<EventFd>, u32)> = Vec::new();
        match &active.vhost {
            Some(vhost) => {
                for (i, call) in vhost.call_events().iter().enumerate() {
                    wanted.push((call.try_clone(), TOKEN_VHOST_CALL + i as u32));
                }
            }
            None => {
                for (i, token) in [(RXQ, TOKEN_RXQ), (TXQ, TOKEN_TXQ)] {
                    if let Some(evt) = active.queue_events.get(i) {
                        wanted.push((evt.try_clone(), token));
                    }
                }
            }
        }
        if let Some(evt) = active.queue_events.get(EVQ) {
            wanted.push((evt.try_clone(), TOKEN_EVQ));
        }
        for (fd, token) in wanted {
            let added = fd.and_then(|fd| {
                ops.add(Events::with_data(&fd, token, EventSet::IN))
                    .map_err(|e| io::Error::other(format!("{e:?}")))?;
                Ok(fd)
            });
            match added {
                Ok(fd) => self.registration.fds.push((fd, token)),
                Err(e) => tracing::error!("vsock: registering queue event {token}: {e}"),
            }
        }
        if let (Some(fd), None) = (muxer_fd, &active.vhost) {
            match ops.add(Events::with_data_raw(fd, TOKEN_MUXER, EventSet::IN)) {
                Ok(()) => self.registration.muxer = true,
                Err(e) => tracing::error!("vsock: registering muxer: {e:?}"),
            }
        }
        active.registered = true;
    }
}

fn signal(interrupt: &VirtioInterrupt) {
    if let Err(e) = interrupt.signal_used_queue() {
        tracing::warn!("vsock: raising interrupt: {e}");
    }
}

/// The header of a chain `VsockPacket` refused, so the guest can get an RST for it.
/// Reads one TX packet: the header, then `hdr.len` payload bytes gathered from the chain's
/// device-readable descriptors into `scratch`. Linux guests (6.x) send large payloads as page
/// fragments, one descriptor each, so a packet may span many descriptors; the header may share
/// the first one (Linux >= 6.2) or have its own. `Err(Some(hdr))`: the header was readable but
/// the packet is unusable (too long, or the descriptors hold less than `hdr.len`); `Err(None)`:
/// not even a header.
fn read_tx_packet<M: std::ops::Deref<Target = GuestMemory>>(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<M>,
    scratch: &mut [u8],
) -> Result<(Header, usize), Option<Header>> {
    use std::io::Read;
    let mut reader = chain.reader(mem).map_err(|e| {
        tracing::debug!("vsock: malformed TX chain: {e}");
        None
    })?;
    let mut raw = [0u8; HEADER_SIZE];
    reader.read_exact(&mut raw).map_err(|_| None)?;
    let hdr = Header::from_bytes(&raw);
    if hdr.len > MAX_PKT_DATA {
        tracing::debug!(len = hdr.len, "vsock: TX payload over the limit");
        return Err(Some(hdr));
    }
    let len = hdr.len as usize;
    let dst = scratch.get_mut(..len).ok_or(Some(hdr))?;
    reader.read_exact(dst).map_err(|_| {
        tracing::debug!(
            len,
            "vsock: TX descriptors hold less than the header's length"
        );
        Some(hdr)
    })?;
    Ok((hdr, len))
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            let src = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o));
            *byte = src.copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if ctx.queues.len() != NUM_QUEUES || ctx.queue_events.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: ctx.queues.len().min(ctx.queue_events.len()),
            });
        }
        self.acked_features = ctx.acked_features & self.avail_features;
        let vhost = match self.datapath {
            Datapath::Vhost => Some(
                VhostDatapath::start(
                    self.config.guest_cid,
                    &ctx.mem,
                    &ctx.queues,
                    &ctx.queue_events,
                    self.acked_features,
                )
                .map_err(|e| ActivateError::Backend(e.to_string()))?,
            ),
            Datapath::Userspace => None,
        };
        self.active = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            queue_events: ctx.queue_events,
            interrupt: ctx.interrupt,
            vhost,
            registered: false,
        });
        self.control_evt.write(1)?;
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            if let Some(vhost) = active.vhost {
                vhost.stop();
            }
        }
        if let Some(m) = &mut self.muxer {
            m.reset_all_connections();
        }
        self.acked_features = 0;
        self.pending_transport_reset = false;
        self.awaiting_reset_ack = false;
        if let Some(m) = &mut self.muxer {
            m.release_requests(Instant::now());
        }
        // The event loop drops this activation's registrations.
        if let Err(e) = self.control_evt.write(1) {
            tracing::warn!("vsock: signalling reset to the event loop: {e}");
        }
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.control_evt,
            TOKEN_CONTROL,
            EventSet::IN,
        )) {
            tracing::error!("vsock: registering control event: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == TOKEN_CONTROL {
            let _ = self.control_evt.read();
            self.sync_registration(ops);
            // Host connections may have queued up, and a restore may owe the guest an event.
            if self.active.is_some() {
                self.deliver_events();
                self.handle_host_events();
            }
            return;
        }
        let Some(active) = self.active.as_ref() else {
            return;
        };
        let drain = |i: usize| {
            if let Some(evt) = active.queue_events.get(i) {
                let _ = evt.read();
            }
        };
        match token {
            TOKEN_RXQ => {
                drain(RXQ);
                self.handle_rx_kick();
            }
            TOKEN_TXQ => {
                drain(TXQ);
                self.handle_tx_kick();
            }
            TOKEN_EVQ => {
                drain(EVQ);
                self.handle_event_kick();
            }
            TOKEN_MUXER => self.handle_host_events(),
            t if t >= TOKEN_VHOST_CALL => {
                let idx = (t - TOKEN_VHOST_CALL) as usize;
                if let Some(call) = active.vhost.as_ref().and_then(|v| v.call_events().get(idx)) {
                    let _ = call.read();
                }
                signal(&active.interrupt);
            }
            _ => {}
        }
    }
}
