//! The MMDS responder: a `smoltcp` interface whose device receives the guest's frames for the
//! MMDS and queues its replies for the guest's RX queue, with a fixed pool of TCP sockets
//! listening on port 80. Everything is bounded: connections (`MAX_CONNECTIONS`; a SYN beyond
//! them is reset), each request's head (`http::MAX_REQUEST_LEN`), and frames waiting for the
//! guest (`MAX_PENDING_FRAMES`; smoltcp holds back, or the frame is dropped, when full).
//!
//! It runs on the device thread, polled when the guest sends it a frame: the link is a memory
//! copy that loses nothing unless the guest stops reading, so no retransmission timer is armed.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Instant as StdInstant;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use vmm_metrics::MmdsMetrics;

use super::http::{self, Parsed, TokenProblem, MAX_REQUEST_LEN};
use super::SharedMmds;

/// The MMDS's own MAC, Firecracker's (`06:01:23:45:67:01`).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
pub const MAX_CONNECTIONS: usize = 8;
pub const MAX_PENDING_FRAMES: usize = 64;
const HTTP_PORT: u16 = 80;
/// Ethernet MTU plus header: the largest frame either side of this link handles.
const MAX_FRAME: usize = 1514;
const SOCKET_RX_BUFFER: usize = MAX_REQUEST_LEN;
const SOCKET_TX_BUFFER: usize = 16 * 1024;

/// The interface's device: one guest frame in, the replies out.
#[derive(Default)]
struct Link {
    incoming: Option<Vec<u8>>,
    outgoing: VecDeque<Vec<u8>>,
    dropped: u64,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut Link);

impl smoltcp::phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // smoltcp asks for at most the MTU we advertise (`MAX_FRAME`).
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        if self.0.outgoing.len() < MAX_PENDING_FRAMES {
            self.0.outgoing.push_back(frame);
        } else {
            self.0.dropped = self.0.dropped.saturating_add(1);
        }
        result
    }
}

impl Device for Link {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.incoming.take()?;
        Some((RxToken(frame), TxToken(self)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        (self.outgoing.len() < MAX_PENDING_FRAMES).then_some(TxToken(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        // The guest offloads checksums (VIRTIO_NET_F_CSUM): its TCP segments arrive with a
        // partial sum. Nothing crosses a wire here, so received sums are not checked; ours are
        // computed, as the guest's driver expects.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

/// One pooled connection: its socket, the request so far, the response and how much is sent.
struct Conn {
    handle: SocketHandle,
    request: Vec<u8>,
    response: Option<Vec<u8>>,
    sent: usize,
    /// A guest connection holds the socket (counted as created, to be counted as destroyed).
    open: bool,
}

impl Conn {
    fn reset(&mut self) {
        self.request.clear();
        self.response = None;
        self.sent = 0;
    }
}

pub struct Responder {
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    link: Link,
    mmds: SharedMmds,
    ip: Ipv4Addr,
    epoch: StdInstant,
    /// The VM's `mmds` counters (none in tests and fuzzing that do not ask for them).
    metrics: Option<MmdsMetrics>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder").field("ip", &self.ip).finish()
    }
}

fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`, valid for writes.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if usize::try_from(n).ok() != Some(bytes.len()) {
        // Only TCP's initial sequence numbers depend on it, on a link nobody else sees.
        tracing::debug!("mmds: getrandom failed, seeding from the clock");
        return u64::from(StdInstant::now().elapsed().subsec_nanos());
    }
    u64::from_ne_bytes(bytes)
}

impl Responder {
    pub fn new(ip: Ipv4Addr, mmds: SharedMmds) -> Self {
        Self::with_seed(ip, mmds, seed())
    }

    /// A responder whose TCP initial sequence numbers follow `seed` (fuzzing replays them).
    pub fn with_seed(ip: Ipv4Addr, mmds: SharedMmds, seed: u64) -> Self {
        let epoch = StdInstant::now();
        let mut link = Link::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(MMDS_MAC)));
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut link, Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            // Prefix 0: every guest address is on-link, so a guest on any subnet with a route
            // to the MMDS gets its answer straight back (the neighbour comes from its ARP).
            if addrs.push(IpCidr::new(IpAddress::Ipv4(ip), 0)).is_err() {
                tracing::error!("mmds: cannot add the MMDS address");
            }
        });
        let mut sockets = SocketSet::new(Vec::with_capacity(MAX_CONNECTIONS));
        let mut conns = Vec::with_capacity(MAX_CONNECTIONS);
        for _ in 0..MAX_CONNECTIONS {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; SOCKET_RX_BUFFER]),
                tcp::SocketBuffer::new(vec![0; SOCKET_TX_BUFFER]),
            );
            // The responder is polled only when the guest sends a frame: an ACK delayed by
            // smoltcp (10 ms by default) or a segment held back by Nagle would wait for the
            // guest's next frame, i.e. its retransmission timer (a second or more).
            socket.set_ack_delay(None);
            socket.set_nagle_enabled(false);
            let handle = sockets.add(socket);
            conns.push(Conn {
                handle,
                request: Vec::new(),
                response: None,
                sent: 0,
                open: false,
            });
        }
        let mut responder = Self {
            iface,
            sockets,
            conns,
            link,
            mmds,
            ip,
            epoch,
            metrics: None,
        };
        responder.serve();
        responder
    }

    /// Counts this responder's traffic in `metrics` from now on.
    pub fn set_metrics(&mut self, metrics: MmdsMetrics) {
        self.metrics = Some(metrics);
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// What a snapshot keeps of this interface's MMDS.
    pub fn state(&self) -> super::MmdsNetState {
        let mmds = self.mmds.lock();
        super::MmdsNetState {
            ipv4: self.ip,
            version: mmds.store.version(),
            imds_compat: mmds.store.imds_compat(),
        }
    }

    fn now(&self) -> Instant {
        let micros = i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX);
        Instant::from_micros(micros)
    }

    /// Takes one guest frame (Ethernet, no virtio-net header) for the MMDS and answers it.
    pub fn receive(&mut self, frame: &[u8]) {
        if let Some(m) = &self.metrics {
            m.rx_accepted.inc();
        }
        if frame.len() > MAX_FRAME + 4 {
            // A GSO frame: more than any request this service takes in one segment.
            tracing::debug!("mmds: dropping a {}-byte frame", frame.len());
            if let Some(m) = &self.metrics {
                m.rx_accepted_err.inc();
            }
            return;
        }
        if !super::intercept::has_answerable_source(frame) {
            tracing::debug!("mmds: dropping a frame from an address it cannot answer");
            if let Some(m) = &self.metrics {
                m.rx_accepted_err.inc();
            }
            return;
        }
        self.link.incoming = Some(frame.to_vec());
        self.poll();
        self.serve();
        self.poll();
    }

    /// The next frame for the guest, if any.
    pub fn pop_frame(&mut self) -> Option<Vec<u8>> {
        let frame = self.link.outgoing.pop_front();
        if let (Some(f), Some(m)) = (&frame, &self.metrics) {
            m.tx_frames.inc();
            m.tx_bytes
                .inc_by(u64::try_from(f.len()).unwrap_or(u64::MAX));
        }
        if frame.is_some() && self.link.outgoing.len() + 1 == MAX_PENDING_FRAMES {
            // Room again: let queued segments out.
            self.serve();
            self.poll();
        }
        frame
    }

    /// Frames waiting for the guest.
    pub fn pending(&self) -> usize {
        self.link.outgoing.len()
    }

    pub fn has_frames(&self) -> bool {
        !self.link.outgoing.is_empty()
    }

    /// Frames dropped because the guest was not taking them.
    pub fn dropped(&self) -> u64 {
        self.link.dropped
    }

    fn poll(&mut self) {
        let now = self.now();
        let dropped = self.link.dropped;
        self.iface.poll(now, &mut self.link, &mut self.sockets);
        if let Some(m) = &self.metrics {
            m.tx_errors
                .inc_by(self.link.dropped.saturating_sub(dropped));
        }
    }

    /// Moves each connection along: listen again when closed, read the request, answer it,
    /// write the answer as room allows, close when done.
    fn serve(&mut self) {
        let mmds = self.mmds.clone();
        let metrics = self.metrics.as_ref();
        for conn in &mut self.conns {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            count_connection(conn, socket.state(), metrics);
            match socket.state() {
                tcp::State::Closed => {
                    conn.reset();
                    if let Err(e) = socket.listen(HTTP_PORT) {
                        tracing::warn!("mmds: listening: {e}");
                    }
                    continue;
                }
                // The answer is sent and acknowledged: free the socket now rather than after
                // TIME-WAIT, so closed connections do not exhaust the pool.
                tcp::State::TimeWait => {
                    socket.abort();
                    conn.reset();
                    if let Err(e) = socket.listen(HTTP_PORT) {
                        tracing::warn!("mmds: listening: {e}");
                    }
                    continue;
                }
                _ => {}
            }
            if conn.response.is_none() && socket.can_recv() {
                let mut buf = [0u8; 1024];
                loop {
                    let room = MAX_REQUEST_LEN.saturating_sub(conn.request.len());
                    let want = room.min(buf.len());
                    match socket.recv_slice(buf.get_mut(..want).unwrap_or_default()) {
                        Ok(n) if n > 0 => conn
                            .request
                            .extend_from_slice(buf.get(..n).unwrap_or_default()),
                        _ => break,
                    }
                }
                let mut guard = mmds.lock();
                let (parsed, token) = http::handle_noting(&mut guard, &conn.request, super::now());
                if let Parsed::Response(bytes) = parsed {
                    count_request(token, metrics);
                    conn.response = Some(bytes);
                }
            }
            if conn.response.is_none() && socket.state() == tcp::State::CloseWait {
                // The guest closed its side before a complete request.
                socket.close();
            }
            if let Some(response) = &conn.response {
                if conn.sent < response.len() && socket.can_send() {
                    if let Ok(n) = socket.send_slice(response.get(conn.sent..).unwrap_or_default())
                    {
                        conn.sent += n;
                    }
                }
                if conn.sent >= response.len() {
                    socket.close();
                }
            }
        }
    }
}

/// Counts a connection once when a guest's SYN takes its socket, and once when the socket is
/// free again (closed, reset back to listening, or in TIME-WAIT, which `serve` aborts).
/// `serve` runs after every poll and a poll takes one guest frame, so no state is missed.
fn count_connection(conn: &mut Conn, state: tcp::State, metrics: Option<&MmdsMetrics>) {
    let free = matches!(
        state,
        tcp::State::Closed | tcp::State::Listen | tcp::State::TimeWait
    );
    if free == conn.open {
        conn.open = !free;
        if let Some(m) = metrics {
            if free {
                m.connections_destroyed.inc();
            } else {
                m.connections_created.inc();
            }
        }
    }
}

fn count_request(token: Option<TokenProblem>, metrics: Option<&MmdsMetrics>) {
    let Some(m) = metrics else { return };
    m.requests_count.inc();
    match token {
        Some(TokenProblem::Missing) => m.rx_no_token.inc(),
        Some(TokenProblem::Invalid) => m.rx_invalid_token.inc(),
        None => {}
    }
}
