//! The vsock userspace datapath below the virtqueues: raw 44-byte packet headers
//! (`Header::from_bytes`) and payloads into the `Muxer`, with a fake backend whose host ends
//! are in-memory socket pairs the input drives (host writes, reads, hang-ups, host-initiated
//! connects, refused and failing connects), interleaved with host-event passes, timeouts and
//! RX packets taken for the guest.
//!
//! Invariants: every packet for the guest is a well-formed host→guest stream packet whose
//! length fits the buffer, only RW carries data, and connections stay within their limit.

#![no_main]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::vsock::backend::{
    BackendConnectError, ConnectAck, HostConnection, VsockBackend,
};
use devices::virtio::vsock::defs::*;
use devices::virtio::vsock::header::{Header, HEADER_SIZE};
use devices::virtio::vsock::muxer::Muxer;
use devices_fuzz::Input;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const GUEST_CID: u64 = 3;
/// Host ends the input can act on; older ones are dropped (the host closes them).
const MAX_HOST_ENDS: usize = 16;

#[derive(Default)]
struct HostSide {
    /// Our end of each stream the muxer holds.
    ends: VecDeque<UnixStream>,
    /// Host-initiated connections waiting for `poll_host_connections`.
    pending: Vec<HostConnection>,
    answers: Vec<io::Result<u32>>,
}

impl HostSide {
    fn keep(&mut self, end: UnixStream) {
        if self.ends.len() >= MAX_HOST_ENDS {
            self.ends.pop_front();
        }
        self.ends.push_back(end);
    }
}

struct FakeBackend {
    wake: EventFd,
    host: Arc<Mutex<HostSide>>,
}

fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    b.set_nonblocking(true).expect("nonblocking");
    (a, b)
}

impl VsockBackend for FakeBackend {
    fn name(&self) -> &'static str {
        "fuzz"
    }

    fn as_raw_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    fn poll_host_connections(&mut self, _now: Instant) -> Vec<HostConnection> {
        let _ = self.wake.read();
        std::mem::take(&mut self.host.lock().expect("lock").pending)
    }

    fn connect_to_host(
        &mut self,
        port: u32,
        _guest_port: u32,
    ) -> Result<UnixStream, BackendConnectError> {
        match port % 4 {
            0 => Err(BackendConnectError::NotListening(port)),
            1 => Err(BackendConnectError::Io {
                port,
                source: io::ErrorKind::ConnectionRefused.into(),
            }),
            _ => {
                let (ours, theirs) = pair();
                self.host.lock().expect("lock").keep(ours);
                Ok(theirs)
            }
        }
    }
}

/// A header from 44 input bytes; usually nudged towards what the muxer accepts so that the
/// state machines, not only the first checks, see the input.
fn header(input: &mut Input) -> (Header, usize) {
    let mode = input.u8();
    let mut raw = [0u8; HEADER_SIZE];
    let bytes = input.take(HEADER_SIZE);
    raw[..bytes.len()].copy_from_slice(bytes);
    let mut h = Header::from_bytes(&raw);
    if mode & 1 != 0 {
        h.src_cid = GUEST_CID;
        h.dst_cid = HOST_CID;
        h.type_ = TYPE_STREAM;
        h.op %= 9;
        h.src_port %= 4;
        h.dst_port = if mode & 2 != 0 {
            LOCAL_PORT_BASE + h.dst_port % 4
        } else {
            h.dst_port % 8
        };
    }
    let len = if mode & 4 != 0 {
        h.len as usize % (MAX_PKT_DATA as usize + 2)
    } else {
        usize::from(input.u16())
    };
    if mode & 8 == 0 {
        h.len = len as u32;
    }
    (h, len)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let host = Arc::new(Mutex::new(HostSide::default()));
    let backend = FakeBackend {
        wake: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        host: host.clone(),
    };
    let wake = backend.wake.try_clone().expect("eventfd clone");
    let mut muxer = Muxer::new(GUEST_CID, vec![Box::new(backend)]).expect("muxer");
    let start = Instant::now();
    let mut now = start;
    let payload = vec![0xa5u8; MAX_PKT_DATA as usize + 2];
    let mut rx_buf = vec![0u8; MAX_PKT_DATA as usize];
    let mut steps = 0;

    while !input.is_empty() && steps < 512 {
        steps += 1;
        match input.u8() % 10 {
            0 | 1 | 2 => {
                let (h, len) = header(&mut input);
                let given = input.take(len);
                // Short inputs are padded: the muxer expects `data.len() == hdr.len` only from
                // a well-formed chain, and must cope with any pair anyway.
                let data = if given.len() == len {
                    given
                } else {
                    &payload[..len]
                };
                muxer.on_guest_packet(&h, data);
            }
            3 => {
                let (h, _) = header(&mut input);
                muxer.on_malformed_packet(&h);
            }
            4 => {
                let which = usize::from(input.u8());
                let len = usize::from(input.u16() % 9000);
                let mut host = host.lock().expect("lock");
                if let Some(end) = host.ends.get_mut(which % MAX_HOST_ENDS) {
                    let _ = end.write(&payload[..len]);
                }
            }
            5 => {
                let which = usize::from(input.u8());
                let mut host = host.lock().expect("lock");
                let n = host.ends.len();
                if n > 0 {
                    if which & 0x80 != 0 {
                        host.ends.remove(which % n);
                    } else if let Some(end) = host.ends.get_mut(which % n) {
                        let mut sink = [0u8; 4096];
                        let _ = end.read(&mut sink);
                    }
                }
            }
            6 => {
                let guest_port = input.u32() % 8;
                let notify = input.bool();
                let (ours, theirs) = pair();
                let ack = if notify {
                    // Weak: a connection still pending here holds this callback (no cycle).
                    let host_for_answer = Arc::downgrade(&host);
                    ConnectAck::Notify(Box::new(move |r| {
                        if let Some(host) = host_for_answer.upgrade() {
                            if let Ok(mut h) = host.lock() {
                                h.answers.push(r);
                            }
                        }
                    }))
                } else {
                    ConnectAck::WriteOk
                };
                let mut h = host.lock().expect("lock");
                h.keep(ours);
                h.pending.push(HostConnection {
                    stream: theirs,
                    guest_port,
                    ack,
                });
                let _ = wake.write(1);
            }
            7 => {
                now += Duration::from_millis(u64::from(input.u16()) * 10);
                muxer.process_host_events(now);
            }
            8 => {
                let cap = match input.u8() % 4 {
                    0 => 0,
                    1 => 1,
                    2 => usize::from(input.u16()),
                    _ => rx_buf.len(),
                };
                let buf = &mut rx_buf[..cap];
                let mut taken = 0;
                let mut h = Header::default();
                while let Some(n) = muxer.fill_rx_packet(&mut h, buf) {
                    assert!(n <= cap, "{n} bytes into a {cap}-byte buffer");
                    assert_eq!(h.len as usize, n);
                    assert_eq!(
                        (h.src_cid, h.dst_cid, h.type_),
                        (HOST_CID, GUEST_CID, TYPE_STREAM)
                    );
                    assert!(
                        (OP_REQUEST..=OP_CREDIT_REQUEST).contains(&h.op),
                        "op {}",
                        h.op
                    );
                    assert!(n == 0 || h.op == OP_RW);
                    taken += 1;
                    assert!(taken <= 100_000, "fill_rx_packet never runs dry");
                }
            }
            _ => match input.u8() % 3 {
                0 => muxer.reset_all_connections(),
                1 => muxer.hold_requests(),
                _ => muxer.release_requests(now),
            },
        }
        assert!(muxer.connection_count() <= MAX_CONNECTIONS);
    }
    muxer.reset_all_connections();
    assert_eq!(muxer.connection_count(), 0);
    assert!(!muxer.has_pending_rx());
});
