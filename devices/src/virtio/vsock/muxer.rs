//! The userspace datapath's switchboard: routes guest packets to connections by (host port,
//! guest port), answers everything else with RST, queues connections that have something for
//! the guest, and watches host streams and backends through its own epoll fd (which the device
//! registers with the VMM event loop). No guest memory or virtqueue here: tests drive it with
//! plain headers and byte slices.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, ErrorKind, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::backend::{BackendConnectError, ConnectAck, HostConnection, VsockBackend};
use super::connection::{ConnState, Connection, Interest};
use super::defs::*;
use super::header::Header;
use vmm_metrics::{IntCounter, VsockMetrics};

/// A connection is named by its host-side port and its guest-side port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

enum RxItem {
    Conn(ConnKey),
    Rst(ConnKey),
}

struct MuxConn {
    conn: Connection<UnixStream>,
    /// Host-initiated only, until the guest answered.
    ack: Option<ConnectAck>,
    /// What the stream is registered for in our epoll; `None` when it is not registered.
    registered: Option<Interest>,
    queued: bool,
    allocated_port: bool,
}

const TIMER_TOKEN: u64 = 1 << 40;
const BACKEND_TOKEN_BASE: u64 = 1 << 41;

pub struct Muxer {
    guest_cid: u64,
    conns: HashMap<ConnKey, MuxConn>,
    fd_owner: HashMap<RawFd, ConnKey>,
    rxq: VecDeque<RxItem>,
    queued_rsts: usize,
    backends: Vec<Box<dyn VsockBackend>>,
    epoll: Epoll,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    next_local_port: u32,
    local_ports_in_use: HashSet<u32>,
    /// The device holds packets for the guest back (see `hold_requests`): host connection
    /// requests wait without timing out.
    requests_held: bool,
    metrics: Option<VsockMetrics>,
}

impl Muxer {
    pub fn new(guest_cid: u64, backends: Vec<Box<dyn VsockBackend>>) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER_TOKEN),
        )?;
        for (i, b) in backends.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                b.as_raw_fd(),
                EpollEvent::new(EventSet::IN, BACKEND_TOKEN_BASE + i as u64),
            )?;
        }
        Ok(Self {
            guest_cid,
            conns: HashMap::new(),
            fd_owner: HashMap::new(),
            rxq: VecDeque::new(),
            queued_rsts: 0,
            backends,
            epoll,
            timer,
            timer_deadline: None,
            next_local_port: LOCAL_PORT_BASE,
            local_ports_in_use: HashSet::new(),
            requests_held: false,
            metrics: None,
        })
    }

    /// Counts connections and dropped packets in `metrics` from now on.
    pub fn set_metrics(&mut self, metrics: VsockMetrics) {
        self.metrics = Some(metrics);
    }

    fn count(&self, counter: impl Fn(&VsockMetrics) -> &IntCounter) {
        if let Some(m) = &self.metrics {
            counter(m).inc();
        }
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The device stopped handing packets to the guest for now: host connection requests must
    /// not time out meanwhile (the guest has not seen them).
    pub fn hold_requests(&mut self) {
        self.requests_held = true;
    }

    /// Packets flow again: every waiting request gets its full timeout from `now`.
    pub fn release_requests(&mut self, now: Instant) {
        if !std::mem::take(&mut self.requests_held) {
            return;
        }
        for mc in self.conns.values_mut() {
            mc.conn.restart_request_deadline(now + CONN_REQUEST_TIMEOUT);
        }
        self.rearm_timer(now);
    }

    /// The port the next host-initiated connection gets (saved in snapshots).
    pub fn next_local_port(&self) -> u32 {
        self.next_local_port
    }

    /// Goes on from a saved `next_local_port`, so ports of connections the guest may still
    /// remember are not handed out again.
    pub fn set_next_local_port(&mut self, port: u32) {
        self.next_local_port = port.max(LOCAL_PORT_BASE);
    }

    pub fn connection_state(&self, key: ConnKey) -> Option<ConnState> {
        self.conns.get(&key).map(|c| c.conn.state())
    }

    pub fn connection_keys(&self) -> Vec<ConnKey> {
        self.conns.keys().copied().collect()
    }

    pub fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// A packet the guest put on the TX queue; `data` holds exactly `hdr.len` bytes.
    pub fn on_guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.guest_cid {
            tracing::debug!(
                src = hdr.src_cid,
                dst = hdr.dst_cid,
                "vsock: packet with wrong CID"
            );
            return self.reply_rst(hdr);
        }
        if hdr.type_ != TYPE_STREAM || data.len() != hdr.len as usize {
            return self.reply_rst(hdr);
        }
        if hdr.op != OP_RW && hdr.len != 0 {
            // Only RW carries a payload.
            return self.on_malformed_packet(hdr);
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        match self.conns.get_mut(&key) {
            Some(mc) => {
                let before = mc.conn.state();
                mc.conn.on_guest_packet(hdr, data);
                self.after_change(key, before);
            }
            None if hdr.op == OP_REQUEST => self.accept_guest_connect(hdr, key),
            None => self.reply_rst(hdr),
        }
    }

    /// A TX descriptor chain whose header was readable but which is otherwise unusable.
    pub fn on_malformed_packet(&mut self, hdr: &Header) {
        if let Some(mc) = self.conns.get_mut(&ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        }) {
            if hdr.src_cid == self.guest_cid && hdr.dst_cid == HOST_CID {
                let before = mc.conn.state();
                mc.conn.kill_with_rst();
                let key = ConnKey {
                    local_port: hdr.dst_port,
                    peer_port: hdr.src_port,
                };
                return self.after_change(key, before);
            }
        }
        self.reply_rst(hdr);
    }

    fn reply_rst(&mut self, hdr: &Header) {
        // Never answer an RST (two devices could ping-pong forever).
        if hdr.op == OP_RST {
            return;
        }
        self.queue_rst(ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        });
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.queued_rsts >= MAX_PENDING_RST + MAX_CONNECTIONS {
            tracing::debug!("vsock: RST queue full; dropping one");
            self.count(|m| &m.packets_dropped);
            return;
        }
        self.queued_rsts += 1;
        self.rxq.push_back(RxItem::Rst(key));
    }

    fn accept_guest_connect(&mut self, hdr: &Header, key: ConnKey) {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: connection limit reached; refusing guest connect");
            self.count(|m| &m.conns_refused);
            return self.reply_rst(hdr);
        }
        let mut stream = None;
        for b in &mut self.backends {
            match b.connect_to_host(hdr.dst_port, hdr.src_port) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(BackendConnectError::NotListening(_)) => continue,
                Err(e) => {
                    tracing::debug!("vsock: {} backend: {e}", b.name());
                    break;
                }
            }
        }
        let Some(stream) = stream else {
            self.count(|m| &m.conns_refused);
            return self.reply_rst(hdr);
        };
        let conn = Connection::new_peer_init(stream, self.guest_cid, hdr);
        self.insert(key, conn, None, false);
    }

    fn add_host_connection(&mut self, hc: HostConnection, now: Instant) {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: connection limit reached; refusing host connect");
            self.count(|m| &m.conns_refused);
            return hc.refuse(ErrorKind::ConnectionRefused);
        }
        let local_port = self.alloc_local_port();
        let key = ConnKey {
            local_port,
            peer_port: hc.guest_port,
        };
        let deadline = now + CONN_REQUEST_TIMEOUT;
        let conn = Connection::new_local_init(
            hc.stream,
            self.guest_cid,
            local_port,
            hc.guest_port,
            deadline,
        );
        self.insert(key, conn, Some(hc.ack), true);
    }

    fn alloc_local_port(&mut self) -> u32 {
        // At most MAX_CONNECTIONS ports are in use, so this finds one quickly.
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(LOCAL_PORT_BASE);
            if self.local_ports_in_use.insert(port) {
                return port;
            }
        }
    }

    fn insert(
        &mut self,
        key: ConnKey,
        conn: Connection<UnixStream>,
        ack: Option<ConnectAck>,
        allocated_port: bool,
    ) {
        let before = conn.state();
        self.count(|m| &m.conns_added);
        self.fd_owner.insert(conn.as_raw_fd(), key);
        self.conns.insert(
            key,
            MuxConn {
                conn,
                ack,
                registered: None,
                queued: false,
                allocated_port,
            },
        );
        self.after_change(key, before);
    }

    /// Bookkeeping after anything happened to a connection: acks, removal, epoll interest,
    /// RX queueing.
    fn after_change(&mut self, key: ConnKey, before: ConnState) {
        let Some(mc) = self.conns.get_mut(&key) else {
            return;
        };
        let state = mc.conn.state();
        if before == ConnState::LocalInit && state != ConnState::LocalInit {
            match (mc.ack.take(), state) {
                (Some(ConnectAck::WriteOk), ConnState::Established) => {
                    let msg = format!("OK {}\n", key.local_port);
                    // A fresh socket always has room for a few bytes; failing that, the host
                    // side is broken and the connection cannot start cleanly.
                    if !matches!(mc.conn.stream_mut().write(msg.as_bytes()), Ok(n) if n == msg.len())
                    {
                        mc.conn.kill_with_rst();
                    }
                }
                (Some(ConnectAck::Notify(f)), ConnState::Established) => f(Ok(key.local_port)),
                (Some(ConnectAck::Notify(f)), _) => f(Err(io::Error::new(
                    ErrorKind::ConnectionRefused,
                    "guest refused the vsock connection",
                ))),
                _ => {}
            }
        }
        if mc.conn.state() == ConnState::Killed {
            let needs_rst = mc.conn.has_pending_rx();
            self.remove(key);
            if needs_rst {
                self.queue_rst(key);
            }
            return;
        }
        let fd = mc.conn.as_raw_fd();
        if mc.conn.host_hup() {
            if mc.registered.take().is_some() {
                // Level-triggered HUP would fire forever; the remaining bytes are read without
                // waiting for readiness.
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        } else {
            let want = mc.conn.interest();
            if mc.registered != Some(want) {
                let mut set = EventSet::empty();
                if want.read {
                    set |= EventSet::IN;
                }
                if want.write {
                    set |= EventSet::OUT;
                }
                let op = if mc.registered.is_some() {
                    ControlOperation::Modify
                } else {
                    ControlOperation::Add
                };
                match self.epoll.ctl(op, fd, EpollEvent::new(set, fd as u64)) {
                    Ok(()) => mc.registered = Some(want),
                    Err(e) => {
                        tracing::warn!("vsock: epoll_ctl on connection: {e}");
                        mc.conn.kill_with_rst();
                        return self.after_change(key, ConnState::Killed);
                    }
                }
            }
        }
        if !mc.queued && mc.conn.has_pending_rx() {
            mc.queued = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
    }

    fn remove(&mut self, key: ConnKey) {
        let Some(mut mc) = self.conns.remove(&key) else {
            return;
        };
        self.count(|m| &m.conns_removed);
        let fd = mc.conn.as_raw_fd();
        self.fd_owner.remove(&fd);
        if mc.registered.is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        if mc.allocated_port {
            self.local_ports_in_use.remove(&key.local_port);
        }
        if let Some(ConnectAck::Notify(f)) = mc.ack.take() {
            f(Err(io::Error::new(
                ErrorKind::ConnectionReset,
                "vsock connection closed before the guest answered",
            )));
        }
        // Dropping `mc` closes the host stream: the host side sees EOF.
    }

    /// The next packet for the guest. `buf` is the RX buffer's data area; returns the payload
    /// length written there, or `None` when nothing is ready.
    pub fn fill_rx_packet(&mut self, hdr: &mut Header, buf: &mut [u8]) -> Option<usize> {
        // Each queued item is visited at most once per call: a connection that cannot use
        // this buffer (e.g. no data room) is re-queued behind us and must not spin here.
        let mut budget = self.rxq.len();
        while budget > 0 {
            budget -= 1;
            let Some(item) = self.rxq.pop_front() else {
                break;
            };
            match item {
                RxItem::Rst(key) => {
                    self.queued_rsts = self.queued_rsts.saturating_sub(1);
                    *hdr = Header::host_to_guest(
                        self.guest_cid,
                        key.local_port,
                        key.peer_port,
                        OP_RST,
                    );
                    return Some(0);
                }
                RxItem::Conn(key) => {
                    let Some(mc) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    mc.queued = false;
                    let before = mc.conn.state();
                    let produced = mc.conn.fill_rx_packet(hdr, buf);
                    self.after_change(key, before);
                    if produced.is_some() {
                        return produced;
                    }
                }
            }
        }
        None
    }

    /// Handles whatever is ready on the muxer's epoll fd; never blocks.
    pub fn process_host_events(&mut self, now: Instant) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: muxer epoll_wait: {e}");
                    0
                }
            };
            for ev in events.iter().take(n) {
                self.dispatch(ev.data(), ev.event_set(), now);
            }
            if n < events.len() {
                break;
            }
        }
        self.sweep(now);
    }

    fn dispatch(&mut self, token: u64, set: EventSet, now: Instant) {
        if token == TIMER_TOKEN {
            // Only read when epoll said so: the fd is blocking.
            let _ = self.timer.wait();
            self.timer_deadline = None;
            return;
        }
        if let Some(i) = token.checked_sub(BACKEND_TOKEN_BASE) {
            let ready = match self.backends.get_mut(i as usize) {
                Some(b) => b.poll_host_connections(now),
                None => return,
            };
            for hc in ready {
                self.add_host_connection(hc, now);
            }
            return;
        }
        let Some(&key) = self.fd_owner.get(&(token as RawFd)) else {
            return;
        };
        if let Some(mc) = self.conns.get_mut(&key) {
            let before = mc.conn.state();
            mc.conn.on_host_event(
                set.contains(EventSet::IN),
                set.contains(EventSet::OUT),
                set.contains(EventSet::HANG_UP),
                set.contains(EventSet::ERROR),
            );
            self.after_change(key, before);
        }
    }

    /// Timeouts: host-initiated connections the guest never answered, backend handshakes.
    pub fn sweep(&mut self, now: Instant) {
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, mc)| !self.requests_held && mc.conn.is_expired(now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(mc) = self.conns.get_mut(&key) {
                tracing::debug!(?key, "vsock: guest did not answer connection request");
                if let Some(ConnectAck::Notify(f)) = mc.ack.take() {
                    f(Err(io::Error::new(
                        ErrorKind::TimedOut,
                        "guest did not answer the vsock connection request",
                    )));
                }
                mc.conn.kill_with_rst();
                self.after_change(key, ConnState::LocalInit);
            }
        }
        let mut ready = Vec::new();
        for b in &mut self.backends {
            if b.next_deadline().is_some_and(|d| d <= now) {
                ready.extend(b.poll_host_connections(now));
            }
        }
        for hc in ready {
            self.add_host_connection(hc, now);
        }
        self.rearm_timer(now);
    }

    fn next_deadline(&self) -> Option<Instant> {
        // Held requests have no deadline running (only connection requests have deadlines).
        let conns = self
            .conns
            .values()
            .filter(|_| !self.requests_held)
            .filter_map(|mc| mc.conn.deadline());
        let backends = self.backends.iter().filter_map(|b| b.next_deadline());
        conns.chain(backends).min()
    }

    fn rearm_timer(&mut self, now: Instant) {
        let next = self.next_deadline();
        if next == self.timer_deadline {
            return;
        }
        let armed = match next {
            Some(d) => {
                // A zero duration would disarm the timer instead of firing at once.
                let wait = d
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        match armed {
            Ok(()) => self.timer_deadline = next,
            Err(e) => tracing::warn!("vsock: arming muxer timer: {e}"),
        }
    }

    /// Closes every connection: host streams see EOF, waiting connects fail with
    /// `ConnectionReset`, queued packets for the guest are dropped. Used on device reset and
    /// snapshot restore (the guest is told through the transport-reset event).
    pub fn reset_all_connections(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.rxq.clear();
        self.queued_rsts = 0;
        self.rearm_timer(Instant::now());
    }
}

impl AsRawFd for Muxer {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}
