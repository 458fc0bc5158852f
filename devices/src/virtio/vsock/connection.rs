//! One vsock stream connection between a guest socket and a host stream: the state machine and
//! the credit accounting of both directions. Pure apart from non-blocking reads and writes on the
//! host stream, which is generic so tests drive it with a scripted mock.
//!
//! Directions, as in the virtio spec: the guest's TX is our "towards host" path (guest data is
//! written to the host stream, buffered in `tx_buf` while the host is slow); our RX is the
//! "towards guest" path (host stream bytes become RW packets, never more than the guest's credit).

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::defs::*;
use super::header::Header;

/// What a connection needs from its host-side endpoint.
pub trait HostStream: Read + Write + AsRawFd + Send {
    /// Half-close: the host reads EOF after the bytes already written.
    fn shutdown_write(&self) -> io::Result<()>;
}

impl HostStream for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host initiated: REQUEST queued or sent to the guest, waiting for its RESPONSE.
    LocalInit,
    /// Guest initiated and the host stream is connected: RESPONSE not sent yet.
    PeerInit,
    Established,
    /// Closed: at most a pending RST is still to be sent, then the muxer drops the connection.
    Killed,
}

/// Control packets waiting for an RX buffer (bit set).
const PEND_REQUEST: u8 = 1 << 0;
const PEND_RST: u8 = 1 << 1;
const PEND_CREDIT_UPDATE: u8 = 1 << 2;
const PEND_CREDIT_REQUEST: u8 = 1 << 3;

/// What the muxer should ask epoll for on the host stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

pub struct Connection<S: HostStream> {
    stream: S,
    state: ConnState,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    pending: u8,
    /// Guest data the host stream has not taken yet; never above `CONN_TX_BUF_SIZE`.
    tx_buf: VecDeque<u8>,
    /// Bytes received from the guest (its tx_cnt, as we count it).
    rx_cnt: Wrapping<u32>,
    /// Bytes of guest data delivered to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest; the guest's view of our free space derives from it.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// A CREDIT_REQUEST went out and no credit has arrived since.
    credit_requested: bool,
    /// The host stream reported readable and we have not drained it to EAGAIN since.
    host_readable: bool,
    /// The host stream was fully closed by its peer (EPOLLHUP).
    host_hup: bool,
    /// The host half-closed its write side; the guest was (or will be) told SHUTDOWN_SEND.
    host_eof: bool,
    guest_no_recv: bool,
    guest_no_send: bool,
    host_write_shut: bool,
    /// For LocalInit: when to give up waiting for the guest's RESPONSE.
    deadline: Option<Instant>,
}

impl<S: HostStream> Connection<S> {
    /// Guest-initiated: the guest sent REQUEST with this header and the backend connected.
    pub fn new_peer_init(stream: S, guest_cid: u64, req: &Header) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            req.dst_port,
            req.src_port,
            ConnState::PeerInit,
        );
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c
    }

    /// Host-initiated: a REQUEST to the guest's `peer_port` is queued.
    pub fn new_local_init(
        stream: S,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            local_port,
            peer_port,
            ConnState::LocalInit,
        );
        c.pending = PEND_REQUEST;
        c.deadline = Some(deadline);
        c
    }

    fn new(stream: S, guest_cid: u64, local_port: u32, peer_port: u32, state: ConnState) -> Self {
        Self {
            stream,
            state,
            guest_cid,
            local_port,
            peer_port,
            pending: 0,
            tx_buf: VecDeque::new(),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            host_readable: false,
            host_hup: false,
            host_eof: false,
            guest_no_recv: false,
            guest_no_send: false,
            host_write_shut: false,
            deadline: None,
        }
    }

    pub fn state(&self) -> ConnState {
        self.state
    }

    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    pub fn stream(&self) -> &S {
        &self.stream
    }

    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Guest data buffered for the host.
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// How many more bytes the guest can take from us right now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        // A guest reporting more consumed than we sent makes `in_flight` huge: no credit.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Our free buffer space as the guest last heard of it.
    pub fn guest_view_of_free_space(&self) -> u32 {
        CONN_TX_BUF_SIZE.saturating_sub((self.rx_cnt - self.last_fwd_cnt_sent).0)
    }

    pub fn host_hup(&self) -> bool {
        self.host_hup
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Restarts the wait for the guest's answer to our REQUEST (used when the request was held
    /// back from the guest for a while).
    pub fn restart_request_deadline(&mut self, deadline: Instant) {
        if self.state == ConnState::LocalInit {
            self.deadline = Some(deadline);
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.state == ConnState::LocalInit && self.deadline.is_some_and(|d| now >= d)
    }

    /// Tear the connection down and tell the guest (RST).
    pub fn kill_with_rst(&mut self) {
        if self.state != ConnState::Killed {
            self.state = ConnState::Killed;
            self.pending = PEND_RST;
            self.tx_buf = VecDeque::new();
            self.deadline = None;
        }
    }

    /// A packet from the guest for this connection. `data` is the payload (`hdr.len` bytes).
    pub fn on_guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        if self.state == ConnState::Killed {
            return;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        match (self.state, hdr.op) {
            (_, OP_RST) => {
                self.state = ConnState::Killed;
                self.pending = 0;
                self.tx_buf = VecDeque::new();
                self.deadline = None;
            }
            (ConnState::LocalInit, OP_RESPONSE) => {
                self.state = ConnState::Established;
                self.deadline = None;
            }
            (_, OP_CREDIT_UPDATE) if self.state != ConnState::LocalInit => {}
            (_, OP_CREDIT_REQUEST) if self.state != ConnState::LocalInit => {
                self.pending |= PEND_CREDIT_UPDATE;
            }
            (ConnState::Established, OP_RW) if !self.guest_no_send => self.push_to_host(data),
            (ConnState::Established, OP_SHUTDOWN) => {
                self.guest_no_recv |= hdr.flags & SHUTDOWN_RCV != 0;
                self.guest_no_send |= hdr.flags & SHUTDOWN_SEND != 0;
                self.after_host_progress();
            }
            // Anything else (REQUEST on a live connection, data before RESPONSE, data after
            // the guest's SHUTDOWN_SEND, unknown ops) is a protocol violation.
            _ => self.kill_with_rst(),
        }
    }

    fn push_to_host(&mut self, data: &[u8]) {
        let mut written = 0;
        if self.tx_buf.is_empty() && !self.host_hup {
            match write_retrying(&mut self.stream, data) {
                Ok(n) => written = n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return self.kill_with_rst(),
            }
        }
        let rest = data.get(written..).unwrap_or_default();
        if self.tx_buf.len().saturating_add(rest.len()) > CONN_TX_BUF_SIZE as usize {
            // The guest ignored the credit we gave it.
            return self.kill_with_rst();
        }
        self.tx_buf.extend(rest);
        self.rx_cnt += Wrapping(data.len() as u32);
        self.fwd_cnt += Wrapping(written as u32);
        self.after_host_progress();
    }

    /// Called when the host stream is writable: drain `tx_buf` as far as it goes.
    fn flush_tx_buf(&mut self) {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match write_retrying(&mut self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return self.kill_with_rst(),
            }
        }
        if self.tx_buf.is_empty() && self.tx_buf.capacity() > 64 * 1024 {
            // Don't keep a burst's worth of memory around per idle connection.
            self.tx_buf = VecDeque::new();
        }
        self.after_host_progress();
    }

    /// Credit updates and orderly close once guest data has moved on to the host.
    fn after_host_progress(&mut self) {
        if self.state != ConnState::Established {
            return;
        }
        if self.guest_view_of_free_space() < CONN_CREDIT_LOW_WATER
            && self.fwd_cnt != self.last_fwd_cnt_sent
        {
            self.pending |= PEND_CREDIT_UPDATE;
        }
        if !self.tx_buf.is_empty() {
            return;
        }
        if self.guest_no_send && !self.host_write_shut {
            self.host_write_shut = true;
            // The host may already be gone; the close below or a later HUP handles that.
            let _ = self.stream.shutdown_write();
        }
        let guest_closing = self.guest_no_send && self.guest_no_recv;
        let both_done = self.guest_no_send && self.host_eof;
        if guest_closing || both_done {
            self.kill_with_rst();
        }
    }

    /// Readiness of the host stream, from epoll.
    pub fn on_host_event(&mut self, readable: bool, writable: bool, hangup: bool, error: bool) {
        if self.state == ConnState::Killed {
            return;
        }
        if error {
            return self.kill_with_rst();
        }
        if hangup {
            self.host_hup = true;
            if self.state != ConnState::Established || self.host_eof {
                // Gone before the guest accepted, or after it already saw our EOF.
                return self.kill_with_rst();
            }
            // The stream now leaves epoll (a level-triggered HUP fires forever), so no
            // writable event follows: guest bytes it cannot take now never reach it. A peer
            // that shut down both ways but still holds its unread bytes reports HUP without
            // OUT; waiting for OUT left the guest's writer blocked for good.
            self.flush_tx_buf();
            if self.state == ConnState::Killed {
                return;
            }
            if !self.tx_buf.is_empty() {
                return self.kill_with_rst();
            }
            // Bytes written before the close are still readable; the EOF after them turns
            // into RST (see `next_rx`).
            self.host_readable = true;
        }
        if readable {
            self.host_readable = true;
        }
        if writable {
            self.flush_tx_buf();
        }
    }

    /// What to watch on the host stream. Reading waits for the guest's credit and for the
    /// connection to be established, so a slow guest throttles the host socket.
    pub fn interest(&self) -> Interest {
        if self.state == ConnState::Killed || self.host_hup {
            return Interest::default();
        }
        Interest {
            read: self.state == ConnState::Established
                && !self.host_readable
                && self.may_read_host()
                && self.peer_credit() > 0,
            write: !self.tx_buf.is_empty(),
        }
    }

    fn may_read_host(&self) -> bool {
        !self.host_eof && !self.guest_no_recv
    }

    pub fn has_pending_rx(&self) -> bool {
        if self.pending != 0 {
            return true;
        }
        match self.state {
            ConnState::PeerInit => true,
            ConnState::Established => {
                self.host_readable
                    && self.may_read_host()
                    && (self.peer_credit() > 0 || !self.credit_requested)
            }
            _ => false,
        }
    }

    /// Produces the next packet for the guest, if any. `buf` is the RX buffer's data area; the
    /// return value is the payload length written into it.
    pub fn fill_rx_packet(&mut self, hdr: &mut Header, buf: &mut [u8]) -> Option<usize> {
        let op_and_len = self.next_rx(buf)?;
        let (op, len, flags) = op_and_len;
        *hdr = Header::host_to_guest(self.guest_cid, self.local_port, self.peer_port, op);
        hdr.len = len as u32;
        hdr.flags = flags;
        hdr.buf_alloc = CONN_TX_BUF_SIZE;
        hdr.fwd_cnt = self.fwd_cnt.0;
        // Every packet carries our credit, so a separate update is no longer needed.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !PEND_CREDIT_UPDATE;
        Some(len)
    }

    fn next_rx(&mut self, buf: &mut [u8]) -> Option<(u16, usize, u32)> {
        if self.pending & PEND_RST != 0 {
            self.pending = 0;
            self.state = ConnState::Killed;
            return Some((OP_RST, 0, 0));
        }
        match self.state {
            ConnState::Killed => return None,
            ConnState::PeerInit => {
                self.state = ConnState::Established;
                return Some((OP_RESPONSE, 0, 0));
            }
            ConnState::LocalInit => {
                if self.pending & PEND_REQUEST != 0 {
                    self.pending &= !PEND_REQUEST;
                    return Some((OP_REQUEST, 0, 0));
                }
                return None;
            }
            ConnState::Established => {}
        }
        if self.pending & PEND_CREDIT_UPDATE != 0 {
            return Some((OP_CREDIT_UPDATE, 0, 0));
        }
        if self.pending & PEND_CREDIT_REQUEST != 0 {
            self.pending &= !PEND_CREDIT_REQUEST;
            return Some((OP_CREDIT_REQUEST, 0, 0));
        }
        if !self.host_readable || !self.may_read_host() {
            return None;
        }
        let credit = self.peer_credit();
        if credit == 0 {
            if self.credit_requested {
                return None;
            }
            self.credit_requested = true;
            return Some((OP_CREDIT_REQUEST, 0, 0));
        }
        let max = buf.len().min(credit as usize).min(MAX_PKT_DATA as usize);
        if max == 0 {
            return None;
        }
        let dst = buf.get_mut(..max)?;
        match read_retrying(&mut self.stream, dst) {
            Ok(0) => {
                self.host_readable = false;
                if self.host_hup {
                    self.kill_with_rst();
                    return self.next_rx(buf);
                }
                self.host_eof = true;
                self.after_host_progress();
                if self.state == ConnState::Killed {
                    return self.next_rx(buf);
                }
                Some((OP_SHUTDOWN, 0, SHUTDOWN_SEND))
            }
            Ok(n) => {
                self.tx_cnt += Wrapping(n as u32);
                Some((OP_RW, n, 0))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.host_readable = false;
                None
            }
            Err(_) => {
                self.kill_with_rst();
                self.next_rx(buf)
            }
        }
    }
}

impl<S: HostStream> AsRawFd for Connection<S> {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

fn write_retrying<W: Write>(w: &mut W, data: &[u8]) -> io::Result<usize> {
    loop {
        match w.write(data) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn read_retrying<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}
