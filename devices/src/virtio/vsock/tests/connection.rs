//! Connection state machine and credit accounting, against a scripted host stream.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::virtio::vsock::connection::{ConnState, Connection, HostStream};
use crate::virtio::vsock::defs::*;
use crate::virtio::vsock::header::Header;

const GUEST_CID: u64 = 3;

/// Host stream double: `incoming` is what the host sends, `written` what it received.
#[derive(Default)]
pub struct MockStream {
    pub incoming: VecDeque<u8>,
    pub eof: bool,
    pub written: Vec<u8>,
    /// Bytes the host accepts before writes would block.
    pub write_room: usize,
    pub write_shut: std::cell::Cell<bool>,
    pub fail_io: bool,
}

impl MockStream {
    fn with_room(room: usize) -> Self {
        Self {
            write_room: room,
            ..Self::default()
        }
    }
}

impl Read for MockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.fail_io {
            return Err(io::Error::from(ErrorKind::ConnectionReset));
        }
        if self.incoming.is_empty() {
            return if self.eof {
                Ok(0)
            } else {
                Err(ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(self.incoming.len());
        for (dst, src) in buf.iter_mut().zip(self.incoming.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }
}

impl Write for MockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.fail_io {
            return Err(io::Error::from(ErrorKind::BrokenPipe));
        }
        if self.write_room == 0 {
            return Err(ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.write_room);
        self.written.extend_from_slice(&buf[..n]);
        self.write_room -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for MockStream {
    fn as_raw_fd(&self) -> RawFd {
        -1
    }
}

impl HostStream for MockStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.write_shut.set(true);
        Ok(())
    }
}

fn guest_hdr(op: u16, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 1000,
        dst_port: 80,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

fn established(stream: MockStream, guest_buf_alloc: u32) -> Connection<MockStream> {
    let req = guest_hdr(OP_REQUEST, 0, guest_buf_alloc, 0);
    let mut c = Connection::new_peer_init(stream, GUEST_CID, &req);
    let (hdr, _) = next(&mut c, 0).expect("response");
    assert_eq!(hdr.op, OP_RESPONSE);
    assert_eq!(c.state(), ConnState::Established);
    c
}

fn next(c: &mut Connection<MockStream>, room: usize) -> Option<(Header, Vec<u8>)> {
    let mut hdr = Header::default();
    let mut buf = vec![0u8; room];
    let n = c.fill_rx_packet(&mut hdr, &mut buf)?;
    buf.truncate(n);
    Some((hdr, buf))
}

#[test]
fn guest_initiated_handshake_and_data_both_ways() {
    let mut c = established(MockStream::with_room(1 << 20), 4096);
    // Guest -> host.
    c.on_guest_packet(&guest_hdr(OP_RW, 5, 4096, 0), b"hello");
    assert_eq!(c.stream().written, b"hello");
    // Host -> guest.
    c.stream_mut().incoming.extend(b"world");
    c.on_host_event(true, false, false, false);
    assert!(c.has_pending_rx());
    let (hdr, data) = next(&mut c, 4096).unwrap();
    assert_eq!(
        (hdr.op, hdr.len, data.as_slice()),
        (OP_RW, 5, &b"world"[..])
    );
    assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((hdr.src_port, hdr.dst_port), (80, 1000));
    assert_eq!(hdr.buf_alloc, CONN_TX_BUF_SIZE);
    assert_eq!(hdr.fwd_cnt, 5, "forwarded guest bytes are reported");
    // Drained to EAGAIN: nothing more, and epoll interest for reading comes back.
    assert!(next(&mut c, 4096).is_none());
    assert!(c.interest().read);
}

#[test]
fn host_initiated_request_response_and_refusal() {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut c = Connection::new_local_init(MockStream::default(), GUEST_CID, 1 << 30, 52, deadline);
    let (hdr, _) = next(&mut c, 0).unwrap();
    assert_eq!(
        (hdr.op, hdr.src_port, hdr.dst_port),
        (OP_REQUEST, 1 << 30, 52)
    );
    assert!(next(&mut c, 0).is_none(), "REQUEST is sent once");
    assert!(!c.is_expired(Instant::now()));
    assert!(c.is_expired(deadline));
    // Data before RESPONSE is a protocol error.
    let mut bad = Connection::new_local_init(MockStream::default(), GUEST_CID, 7, 52, deadline);
    next(&mut bad, 0);
    bad.on_guest_packet(&guest_hdr(OP_RW, 1, 4096, 0), b"x");
    assert_eq!(bad.state(), ConnState::Killed);
    assert_eq!(next(&mut bad, 0).unwrap().0.op, OP_RST);
    // RESPONSE establishes.
    let mut resp = guest_hdr(OP_RESPONSE, 0, 8192, 0);
    resp.src_port = 52;
    resp.dst_port = 1 << 30;
    c.on_guest_packet(&resp, &[]);
    assert_eq!(c.state(), ConnState::Established);
    assert_eq!(c.peer_credit(), 8192);
    // Guest RST: closed, nothing to answer.
    c.on_guest_packet(&guest_hdr(OP_RST, 0, 0, 0), &[]);
    assert_eq!(c.state(), ConnState::Killed);
    assert!(!c.has_pending_rx());
}

#[test]
fn never_sends_more_than_guest_credit() {
    let mut c = established(MockStream::with_room(1 << 20), 100);
    c.stream_mut().incoming.extend(vec![7u8; 300]);
    c.on_host_event(true, false, false, false);
    let (hdr, data) = next(&mut c, 4096).unwrap();
    assert_eq!((hdr.op, data.len()), (OP_RW, 100));
    assert_eq!(c.peer_credit(), 0);
    assert!(
        !c.interest().read,
        "no credit: stop reading the host socket"
    );
    // Out of credit with data waiting: ask once, then wait.
    assert_eq!(next(&mut c, 4096).unwrap().0.op, OP_CREDIT_REQUEST);
    assert!(next(&mut c, 4096).is_none());
    assert!(!c.has_pending_rx());
    // Guest consumed 60 bytes.
    c.on_guest_packet(&guest_hdr(OP_CREDIT_UPDATE, 0, 100, 60), &[]);
    assert!(c.has_pending_rx());
    let (_, data) = next(&mut c, 4096).unwrap();
    assert_eq!(data.len(), 60);
    // A guest whose fwd_cnt runs ahead of what we sent gets nothing (no wraparound credit).
    c.on_guest_packet(&guest_hdr(OP_CREDIT_UPDATE, 0, 100, 10_000), &[]);
    assert_eq!(c.peer_credit(), 0);
}

#[test]
fn credit_request_answered_with_update() {
    let mut c = established(MockStream::with_room(1 << 20), 4096);
    c.on_guest_packet(&guest_hdr(OP_CREDIT_REQUEST, 0, 4096, 0), &[]);
    let (hdr, _) = next(&mut c, 0).unwrap();
    assert_eq!(hdr.op, OP_CREDIT_UPDATE);
    assert_eq!(hdr.buf_alloc, CONN_TX_BUF_SIZE);
}

#[test]
fn slow_host_buffers_then_sends_credit_update_when_guest_view_is_low() {
    let mut c = established(MockStream::with_room(0), 4096);
    // Guest fills 200 KiB while the host takes nothing.
    let chunk = vec![1u8; 50 * 1024];
    let mut sent = 0u32;
    for _ in 0..4 {
        c.on_guest_packet(&guest_hdr(OP_RW, chunk.len() as u32, 4096, 0), &chunk);
        sent += chunk.len() as u32;
    }
    assert_eq!(c.state(), ConnState::Established);
    assert_eq!(c.tx_buffered(), sent as usize);
    assert!(c.interest().write);
    assert!(
        !c.has_pending_rx(),
        "nothing forwarded yet, so no credit to give"
    );
    assert!(c.guest_view_of_free_space() < CONN_CREDIT_LOW_WATER);
    // Host drains everything.
    c.stream_mut().write_room = usize::MAX;
    c.on_host_event(false, true, false, false);
    assert_eq!(c.tx_buffered(), 0);
    assert_eq!(c.stream().written.len(), sent as usize);
    let (hdr, _) = next(&mut c, 0).unwrap();
    assert_eq!(hdr.op, OP_CREDIT_UPDATE);
    assert_eq!(hdr.fwd_cnt, sent);
    assert_eq!(c.guest_view_of_free_space(), CONN_TX_BUF_SIZE);
    assert!(!c.interest().write);
}

#[test]
fn small_progress_does_not_spam_credit_updates() {
    let mut c = established(MockStream::with_room(1 << 20), 4096);
    c.on_guest_packet(&guest_hdr(OP_RW, 10, 4096, 0), &[0; 10]);
    assert!(!c.has_pending_rx());
}

#[test]
fn guest_overrunning_our_buffer_is_reset() {
    let mut c = established(MockStream::with_room(0), 4096);
    let chunk = vec![0u8; 64 * 1024];
    for _ in 0..4 {
        c.on_guest_packet(&guest_hdr(OP_RW, chunk.len() as u32, 4096, 0), &chunk);
    }
    assert_eq!(c.state(), ConnState::Established, "exactly buf_alloc fits");
    c.on_guest_packet(&guest_hdr(OP_RW, 1, 4096, 0), &[0]);
    assert_eq!(c.state(), ConnState::Killed);
    assert_eq!(c.tx_buffered(), 0, "buffer released");
    assert_eq!(next(&mut c, 0).unwrap().0.op, OP_RST);
}

#[test]
fn host_half_close_then_guest_close() {
    let mut c = established(MockStream::with_room(1 << 20), 4096);
    c.stream_mut().incoming.extend(b"bye");
    c.stream_mut().eof = true;
    c.on_host_event(true, false, false, false);
    assert_eq!(next(&mut c, 64).unwrap().1, b"bye");
    let (hdr, _) = next(&mut c, 64).unwrap();
    assert_eq!((hdr.op, hdr.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    // Guest still sends after our half-close.
    c.on_guest_packet(&guest_hdr(OP_RW, 2, 4096, 3), b"ok");
    assert_eq!(c.stream().written, b"ok");
    // Guest closes: RST.
    let mut sd = guest_hdr(OP_SHUTDOWN, 0, 4096, 3);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    c.on_guest_packet(&sd, &[]);
    assert_eq!(c.state(), ConnState::Killed);
    assert_eq!(next(&mut c, 0).unwrap().0.op, OP_RST);
}

#[test]
fn host_disappearing_gives_guest_data_then_rst() {
    let mut c = established(MockStream::with_room(1 << 20), 4096);
    c.stream_mut().incoming.extend(b"last words");
    c.stream_mut().eof = true;
    c.on_host_event(true, false, true, false);
    assert!(c.host_hup());
    assert_eq!(
        c.interest(),
        Default::default(),
        "a hung-up stream is not watched"
    );
    assert_eq!(next(&mut c, 64).unwrap().1, b"last words");
    assert_eq!(next(&mut c, 64).unwrap().0.op, OP_RST);
    assert_eq!(c.state(), ConnState::Killed);
}

#[test]
fn host_hanging_up_with_guest_bytes_it_cannot_take_resets_at_once() {
    let mut c = established(MockStream::with_room(0), 4096);
    c.on_guest_packet(&guest_hdr(OP_RW, 5, 4096, 0), b"abcde");
    assert_eq!(c.tx_buffered(), 5);
    // HUP without OUT: the stream leaves epoll, so those bytes could only wait forever.
    c.on_host_event(true, false, true, false);
    assert_eq!(c.state(), ConnState::Killed);
    assert_eq!(next(&mut c, 64).unwrap().0.op, OP_RST);
}

#[test]
fn host_hanging_up_still_takes_guest_bytes_it_can_and_gives_its_last_words() {
    let mut c = established(MockStream::with_room(0), 4096);
    c.on_guest_packet(&guest_hdr(OP_RW, 5, 4096, 0), b"abcde");
    c.stream_mut().write_room = 64;
    c.stream_mut().incoming.extend(b"bye");
    c.stream_mut().eof = true;
    c.on_host_event(true, false, true, false);
    assert_eq!(c.stream().written, b"abcde");
    assert_eq!(c.state(), ConnState::Established);
    assert_eq!(next(&mut c, 64).unwrap().1, b"bye");
    assert_eq!(next(&mut c, 64).unwrap().0.op, OP_RST);
}

/// The race `tests/vsock.rs`'s killed-client case hit: the host end shut down both ways while
/// its unread bytes still fill the socket, so epoll says HUP but not OUT.
#[test]
fn a_real_socket_shut_down_while_full_resets_the_blocked_guest_writer() {
    use std::os::unix::net::UnixStream;
    let (ours, host) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let mut c = {
        let req = guest_hdr(OP_REQUEST, 0, 4096, 0);
        let mut c = Connection::new_peer_init(ours, GUEST_CID, &req);
        let mut hdr = Header::default();
        c.fill_rx_packet(&mut hdr, &mut []).expect("response");
        c
    };
    // The guest writes until the host socket is full and our buffer holds the rest.
    let chunk = vec![7u8; 32 * 1024];
    let mut fwd = 0u32;
    while c.tx_buffered() == 0 {
        c.on_guest_packet(&guest_hdr(OP_RW, chunk.len() as u32, 4096, 0), &chunk);
        fwd += chunk.len() as u32;
        assert!(fwd < 64 << 20, "the socket never filled");
    }
    host.shutdown(std::net::Shutdown::Both).unwrap();
    c.on_host_event(true, false, true, false);
    assert_eq!(c.state(), ConnState::Killed);
    let mut hdr = Header::default();
    c.fill_rx_packet(&mut hdr, &mut []).expect("RST");
    assert_eq!(hdr.op, OP_RST);
    drop(host);
}

#[test]
fn guest_shutdown_waits_for_buffered_data() {
    let mut c = established(MockStream::with_room(2), 4096);
    c.on_guest_packet(&guest_hdr(OP_RW, 5, 4096, 0), b"abcde");
    let mut sd = guest_hdr(OP_SHUTDOWN, 0, 4096, 0);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    c.on_guest_packet(&sd, &[]);
    assert_eq!(c.state(), ConnState::Established, "flush first");
    assert!(
        !c.stream().write_shut.get(),
        "no EOF to the host before its data"
    );
    c.stream_mut().write_room = 100;
    c.on_host_event(false, true, false, false);
    assert_eq!(c.stream().written, b"abcde");
    assert!(c.stream().write_shut.get());
    assert_eq!(c.state(), ConnState::Killed);
    assert_eq!(next(&mut c, 0).unwrap().0.op, OP_RST);
}

#[test]
fn protocol_violations_reset() {
    for op in [OP_REQUEST, OP_RESPONSE, 0, 99] {
        let mut c = established(MockStream::with_room(100), 4096);
        c.on_guest_packet(&guest_hdr(op, 0, 4096, 0), &[]);
        assert_eq!(c.state(), ConnState::Killed, "op {op}");
        assert_eq!(next(&mut c, 0).unwrap().0.op, OP_RST);
    }
    // Data after the guest said it would send no more.
    let mut c = established(MockStream::with_room(100), 4096);
    let mut sd = guest_hdr(OP_SHUTDOWN, 0, 4096, 0);
    sd.flags = SHUTDOWN_SEND;
    c.on_guest_packet(&sd, &[]);
    assert_eq!(c.state(), ConnState::Established);
    c.on_guest_packet(&guest_hdr(OP_RW, 1, 4096, 0), b"x");
    assert_eq!(c.state(), ConnState::Killed);
}

#[test]
fn host_io_errors_reset() {
    let mut c = established(MockStream::with_room(100), 4096);
    c.stream_mut().fail_io = true;
    c.on_host_event(true, false, false, false);
    assert_eq!(next(&mut c, 64).unwrap().0.op, OP_RST);
    let mut c = established(MockStream::with_room(100), 4096);
    c.stream_mut().fail_io = true;
    c.on_guest_packet(&guest_hdr(OP_RW, 1, 4096, 0), b"x");
    assert_eq!(c.state(), ConnState::Killed);
    let mut c = established(MockStream::with_room(100), 4096);
    c.on_host_event(false, false, false, true);
    assert_eq!(c.state(), ConnState::Killed);
}

#[test]
fn rx_packets_respect_buffer_and_max_size() {
    let mut c = established(MockStream::with_room(100), u32::MAX);
    c.stream_mut().incoming.extend(vec![0u8; 200 * 1024]);
    c.on_host_event(true, false, false, false);
    let (_, small) = next(&mut c, 10).unwrap();
    assert_eq!(small.len(), 10);
    let (_, big) = next(&mut c, 1 << 20).unwrap();
    assert_eq!(big.len(), MAX_PKT_DATA as usize);
    assert!(next(&mut c, 0).is_none(), "no room, no packet");
}
