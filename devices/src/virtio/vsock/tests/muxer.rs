//! Muxer routing, RST policy, and both backends with real sockets.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::support::*;
use crate::virtio::vsock::backend::{InProcessBackend, UdsBackend, VsockBackend};
use crate::virtio::vsock::connection::ConnState;
use crate::virtio::vsock::defs::*;
use crate::virtio::vsock::header::Header;
use crate::virtio::vsock::muxer::{ConnKey, Muxer};

fn uds_muxer(dir: &Path) -> (Muxer, PathBuf) {
    let path = dir.join("v.sock");
    let uds = UdsBackend::bind(&path).unwrap();
    (Muxer::new(GUEST_CID, vec![Box::new(uds)]).unwrap(), path)
}

fn only(pkts: Vec<(Header, Vec<u8>)>) -> (Header, Vec<u8>) {
    assert_eq!(pkts.len(), 1, "expected one packet, got {pkts:?}");
    pkts.into_iter().next().unwrap()
}

#[test]
fn stray_packets_get_rst_and_rst_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, _) = uds_muxer(dir.path());
    // Unknown connection.
    send(&mut m, OP_RW, 1000, 80, b"x");
    let (h, _) = only(recv_all(&mut m));
    assert_eq!(
        (h.op, h.src_port, h.dst_port, h.dst_cid),
        (OP_RST, 80, 1000, GUEST_CID)
    );
    // Wrong source CID, wrong destination CID.
    let mut bad = hdr(OP_REQUEST, 1, 2);
    bad.src_cid = 99;
    m.on_guest_packet(&bad, &[]);
    let mut bad = hdr(OP_REQUEST, 1, 2);
    bad.dst_cid = 7;
    m.on_guest_packet(&bad, &[]);
    let rsts = recv_all(&mut m);
    assert_eq!(rsts.len(), 2);
    assert!(rsts
        .iter()
        .all(|(h, _)| h.op == OP_RST && h.dst_cid == GUEST_CID));
    // Bad type, payload on a non-RW op, length mismatch.
    let mut bad = hdr(OP_REQUEST, 1, 2);
    bad.type_ = 2;
    m.on_guest_packet(&bad, &[]);
    send(&mut m, OP_REQUEST, 1, 2, b"junk");
    let mut bad = hdr(OP_RW, 1, 2);
    bad.len = 10;
    m.on_guest_packet(&bad, b"short");
    assert_eq!(recv_all(&mut m).len(), 3);
    // Unknown op on an unknown connection.
    send(&mut m, 42, 1, 2, &[]);
    assert_eq!(only(recv_all(&mut m)).0.op, OP_RST);
    // RST is never answered.
    send(&mut m, OP_RST, 1, 2, &[]);
    assert!(recv_all(&mut m).is_empty());
    // Guest connecting where nothing listens.
    send(&mut m, OP_REQUEST, 1, 5555, &[]);
    assert_eq!(only(recv_all(&mut m)).0.op, OP_RST);
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn rst_flood_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, _) = uds_muxer(dir.path());
    for port in 0..10_000 {
        send(&mut m, OP_RW, port, 80, b"x");
    }
    let n = recv_all(&mut m).len();
    assert!(n <= MAX_PENDING_RST + MAX_CONNECTIONS, "{n} RSTs queued");
    assert!(n >= MAX_PENDING_RST);
}

#[test]
fn uds_host_initiated_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, path) = uds_muxer(dir.path());
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = only(pump_recv(&mut m));
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(req.dst_port, 52);
    assert!(req.src_port >= LOCAL_PORT_BASE);
    let local = req.src_port;
    send(&mut m, OP_RESPONSE, 52, local, &[]);
    assert_eq!(
        m.connection_state(ConnKey {
            local_port: local,
            peer_port: 52
        }),
        Some(ConnState::Established)
    );
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {local}\n"));
    // Host -> guest.
    client.write_all(b"ping").unwrap();
    let (h, data) = only(pump_recv(&mut m));
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"ping"[..]));
    // Guest -> host.
    send(&mut m, OP_RW, 52, local, b"pong");
    let mut buf = [0u8; 4];
    reader.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    // Host client disappears: guest sees RST, connection gone.
    drop(reader);
    drop(client);
    let (h, _) = only(pump_recv(&mut m));
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, local, 52));
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn uds_refused_host_connection_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, path) = uds_muxer(dir.path());
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 9\n").unwrap();
    let (req, _) = only(pump_recv(&mut m));
    send(&mut m, OP_RST, 9, req.src_port, &[]);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no OK for a refused connection");
    assert_eq!(m.connection_count(), 0);
    // A bad handshake line is dropped without bothering the guest.
    let mut bad = UnixStream::connect(&path).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    // Pump from another angle: the client sees EOF once the backend closed it.
    let handle = std::thread::spawn(move || bad.read_to_end(&mut rest).map(|_| rest));
    pump_until(&mut m, |_| handle.is_finished());
    assert!(handle.join().unwrap().unwrap().is_empty());
    assert!(recv_all(&mut m).is_empty());
}

#[test]
fn uds_guest_initiated_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, path) = uds_muxer(dir.path());
    let listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
    send(&mut m, OP_REQUEST, 1234, 5000, &[]);
    let (h, _) = only(recv_all(&mut m));
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 5000, 1234));
    let (mut host, _) = listener.accept().unwrap();
    send(&mut m, OP_RW, 1234, 5000, b"abc");
    let mut buf = [0u8; 3];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"abc");
    host.write_all(b"xyz").unwrap();
    let (h, data) = only(pump_recv(&mut m));
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"xyz"[..]));
    // Guest half-closes: host reads EOF but can still answer.
    let mut sd = hdr(OP_SHUTDOWN, 1234, 5000);
    sd.flags = SHUTDOWN_SEND;
    m.on_guest_packet(&sd, &[]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    host.write_all(b"late").unwrap();
    let (_, data) = only(pump_recv(&mut m));
    assert_eq!(data, b"late");
    // Host closes: guest gets RST.
    drop(host);
    assert_eq!(only(pump_recv(&mut m)).0.op, OP_RST);
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn reset_all_connections_closes_host_side() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, path) = uds_muxer(dir.path());
    let listener = UnixListener::bind(format!("{}_7", path.display())).unwrap();
    send(&mut m, OP_REQUEST, 1, 7, &[]);
    send(&mut m, OP_REQUEST, 2, 7, &[]);
    assert_eq!(m.connection_count(), 2);
    let mut a = listener.accept().unwrap().0;
    let mut b = listener.accept().unwrap().0;
    m.reset_all_connections();
    assert_eq!(m.connection_count(), 0);
    assert!(!m.has_pending_rx(), "queued RESPONSEs are dropped");
    let mut buf = Vec::new();
    assert_eq!(a.read_to_end(&mut buf).unwrap(), 0);
    assert_eq!(b.read_to_end(&mut buf).unwrap(), 0);
    // The muxer keeps working afterwards.
    send(&mut m, OP_REQUEST, 3, 7, &[]);
    assert_eq!(only(recv_all(&mut m)).0.op, OP_RESPONSE);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn in_process_connect_and_listen() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = runtime();
    let inproc = InProcessBackend::new().unwrap();
    let handle = inproc.handle();
    let mut m = Muxer::new(GUEST_CID, vec![Box::new(inproc)]).unwrap();

    // Host-initiated: resolves after the guest's RESPONSE.
    let pending = rt.spawn(handle.connect(52));
    let (req, _) = only(pump_recv(&mut m));
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 52));
    assert!(!pending.is_finished());
    send(&mut m, OP_RESPONSE, 52, req.src_port, &[]);
    let mut stream = rt.block_on(pending).unwrap().unwrap();
    rt.block_on(stream.write_all(b"to guest")).unwrap();
    let (h, data) = only(pump_recv(&mut m));
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"to guest"[..]));
    send(&mut m, OP_RW, 52, req.src_port, b"to host");
    let mut buf = [0u8; 7];
    rt.block_on(stream.read_exact(&mut buf)).unwrap();
    assert_eq!(&buf, b"to host");

    // Refused by the guest.
    let pending = rt.spawn(handle.connect(53));
    let (req, _) = only(pump_recv(&mut m));
    send(&mut m, OP_RST, 53, req.src_port, &[]);
    let err = rt.block_on(pending).unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);

    // Guest-initiated, to a listener.
    let mut listener = handle.listen(7000).unwrap();
    assert_eq!(
        handle.listen(7000).err().map(|e| e.kind()),
        Some(ErrorKind::AddrInUse)
    );
    send(&mut m, OP_REQUEST, 4321, 7000, &[]);
    assert_eq!(only(recv_all(&mut m)).0.op, OP_RESPONSE);
    let (mut s, guest_port) = rt.block_on(listener.accept()).unwrap();
    assert_eq!(guest_port, 4321);
    send(&mut m, OP_RW, 4321, 7000, b"hi");
    let mut buf = [0u8; 2];
    rt.block_on(s.read_exact(&mut buf)).unwrap();
    assert_eq!(&buf, b"hi");
    // Dropped listener: the port refuses again and can be re-listened.
    drop(listener);
    send(&mut m, OP_REQUEST, 4322, 7000, &[]);
    assert_eq!(only(recv_all(&mut m)).0.op, OP_RST);
    let _again = handle.listen(7000).unwrap();

    // The user dropping its stream resets the guest side.
    drop(stream);
    let pkts = pump_recv(&mut m);
    assert!(pkts.iter().any(|(h, _)| h.op == OP_RST && h.dst_port == 52));

    // Device gone: waiting connects fail, new ones are refused.
    let pending = rt.spawn(handle.connect(60));
    pump_until(&mut m, |m| m.has_pending_rx());
    drop(m);
    assert!(rt.block_on(pending).unwrap().is_err());
    assert!(rt.block_on(handle.connect(61)).is_err());
}

#[test]
fn handed_over_stream_gets_the_answer_before_guest_bytes() {
    let inproc = InProcessBackend::new().unwrap();
    let handle = inproc.handle();
    let mut m = Muxer::new(GUEST_CID, vec![Box::new(inproc)]).unwrap();

    // Accepted: the callback's bytes come first, then the guest's, on the caller's own socket.
    let (mut client, served) = UnixStream::pair().unwrap();
    let writer = served.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    handle
        .connect_stream(served, 1024, move |answer| {
            let _ = (&writer).write_all(b"HELLO\n");
            let _ = tx.send(answer.map_err(|e| e.kind()));
        })
        .unwrap();
    let (req, _) = only(pump_recv(&mut m));
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1024));
    assert!(rx.try_recv().is_err(), "answered before the guest did");
    send(&mut m, OP_RESPONSE, 1024, req.src_port, &[]);
    send(&mut m, OP_RW, 1024, req.src_port, b"guest");
    assert!(rx.recv().unwrap().is_ok());
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 11];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HELLO\nguest");
    client.write_all(b"up").unwrap();
    let (h, data) = only(pump_recv(&mut m));
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"up"[..]));

    // Refused: the callback hears why.
    let (_client, served) = UnixStream::pair().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    handle
        .connect_stream(served, 1025, move |answer| {
            let _ = tx.send(answer.map_err(|e| e.kind()));
        })
        .unwrap();
    let (req, _) = only(pump_recv(&mut m));
    send(&mut m, OP_RST, 1025, req.src_port, &[]);
    assert_eq!(rx.recv().unwrap(), Err(ErrorKind::ConnectionRefused));

    // A blocking listener, for threads without a runtime.
    let mut listener = handle.listen(1023).unwrap();
    send(&mut m, OP_REQUEST, 5555, 1023, &[]);
    assert_eq!(only(recv_all(&mut m)).0.op, OP_RESPONSE);
    let (mut s, guest_port) = listener.accept_blocking().unwrap();
    assert_eq!(guest_port, 5555);
    send(&mut m, OP_RW, 5555, 1023, b"READY 1\n");
    let mut line = [0u8; 8];
    s.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"READY 1\n");
    drop(m);
    assert!(listener.accept_blocking().is_err());
}

#[test]
fn host_connect_times_out_when_guest_is_silent() {
    let rt = runtime();
    let inproc = InProcessBackend::new().unwrap();
    let handle = inproc.handle();
    let mut m = Muxer::new(GUEST_CID, vec![Box::new(inproc)]).unwrap();
    let pending = rt.spawn(handle.connect(52));
    let (req, _) = only(pump_recv(&mut m));
    assert_eq!(req.op, OP_REQUEST);
    m.sweep(std::time::Instant::now() + CONN_REQUEST_TIMEOUT);
    let err = rt.block_on(pending).unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert_eq!(only(recv_all(&mut m)).0.op, OP_RST);
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn slow_guest_throttles_host_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, path) = uds_muxer(dir.path());
    let listener = UnixListener::bind(format!("{}_8", path.display())).unwrap();
    let mut req = hdr(OP_REQUEST, 1, 8);
    req.buf_alloc = 1000;
    m.on_guest_packet(&req, &[]);
    recv_all(&mut m);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[5u8; 5000]).unwrap();
    pump_until(&mut m, |m| m.has_pending_rx());
    let pkts = recv_all(&mut m);
    let data: usize = pkts
        .iter()
        .filter(|(h, _)| h.op == OP_RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(data, 1000, "exactly the guest's credit");
    assert!(pkts.iter().any(|(h, _)| h.op == OP_CREDIT_REQUEST));
    // More host events don't produce more data until the guest grants credit.
    for _ in 0..10 {
        m.process_host_events(std::time::Instant::now());
    }
    assert!(recv_all(&mut m).is_empty());
    let mut upd = hdr(OP_CREDIT_UPDATE, 1, 8);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 1000;
    m.on_guest_packet(&upd, &[]);
    let more: usize = pump_recv(&mut m).iter().map(|(_, d)| d.len()).sum();
    assert_eq!(more, 1000);
}

#[test]
fn thousand_connect_close_cycles_leak_no_fds() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, path) = uds_muxer(dir.path());
    let listener = UnixListener::bind(format!("{}_9", path.display())).unwrap();
    let cycle = |m: &mut Muxer, i: u32| {
        if i & 1 == 0 {
            // Guest-initiated, closed by the guest.
            let port = 10_000 + i;
            send(m, OP_REQUEST, port, 9, &[]);
            assert_eq!(only(recv_all(m)).0.op, OP_RESPONSE);
            let (mut host, _) = listener.accept().unwrap();
            send(m, OP_RW, port, 9, b"x");
            let mut b = [0u8; 1];
            host.read_exact(&mut b).unwrap();
            let mut sd = hdr(OP_SHUTDOWN, port, 9);
            sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
            m.on_guest_packet(&sd, &[]);
            assert_eq!(only(recv_all(m)).0.op, OP_RST);
        } else {
            // Host-initiated, closed by the host.
            let mut client = UnixStream::connect(&path).unwrap();
            client
                .write_all(format!("CONNECT {i}\n").as_bytes())
                .unwrap();
            let (req, _) = only(pump_recv(m));
            send(m, OP_RESPONSE, i, req.src_port, &[]);
            let mut ok = [0u8; 3];
            client.read_exact(&mut ok).unwrap();
            drop(client);
            let pkts = pump_recv(m);
            assert_eq!(pkts.last().unwrap().0.op, OP_RST);
        }
        assert_eq!(m.connection_count(), 0);
    };
    for i in 0..20 {
        cycle(&mut m, i);
    }
    let before = open_fds();
    for i in 20..1020 {
        cycle(&mut m, i);
    }
    let after = open_fds();
    // Other tests run in parallel threads and open fds too; a leak here would be >= 1000.
    assert!(after <= before + 100, "fds grew from {before} to {after}");
}

#[test]
fn backend_trait_objects_report_names() {
    let dir = tempfile::tempdir().unwrap();
    let uds = UdsBackend::bind(&dir.path().join("s")).unwrap();
    let inproc = InProcessBackend::new().unwrap();
    let names: Vec<&str> = [&uds as &dyn VsockBackend, &inproc]
        .iter()
        .map(|b| b.name())
        .collect();
    assert_eq!(names, ["uds", "in-process"]);
}

#[test]
fn uds_replaces_stale_socket_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "listener drop leaves the file behind");
    let live = UdsBackend::bind(&path).unwrap();
    // A live socket is not stolen.
    assert!(UdsBackend::bind(&path).is_err());
    drop(live);
    assert!(!path.exists());
}

#[test]
fn rx_buffer_without_data_room_does_not_spin() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, path) = uds_muxer(dir.path());
    let listener = UnixListener::bind(format!("{}_8", path.display())).unwrap();
    send(&mut m, OP_REQUEST, 1, 8, &[]);
    recv_all(&mut m);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(b"data").unwrap();
    pump_until(&mut m, |m| m.has_pending_rx());
    // A header-only buffer cannot carry data: nothing is produced, the data stays queued.
    let mut h = Header::default();
    assert_eq!(m.fill_rx_packet(&mut h, &mut []), None);
    assert!(m.has_pending_rx());
    let (h, data) = only(recv_all(&mut m));
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"data"[..]));
}

#[test]
fn held_host_connect_does_not_time_out_and_gets_a_full_timeout_once_released() {
    let rt = runtime();
    let inproc = InProcessBackend::new().unwrap();
    let handle = inproc.handle();
    let mut m = Muxer::new(GUEST_CID, vec![Box::new(inproc)]).unwrap();
    m.hold_requests();
    let pending = rt.spawn(handle.connect(52));
    let (req, _) = only(pump_recv(&mut m));
    assert_eq!(req.op, OP_REQUEST);
    let start = std::time::Instant::now();
    // Held (the guest has not been given the request yet): no timeout, however long.
    m.sweep(start + 3 * CONN_REQUEST_TIMEOUT);
    assert_eq!(m.connection_count(), 1);
    // Released: the full timeout runs from then.
    let released = start + 3 * CONN_REQUEST_TIMEOUT;
    m.release_requests(released);
    m.sweep(released + CONN_REQUEST_TIMEOUT / 2);
    assert_eq!(m.connection_count(), 1);
    m.sweep(released + CONN_REQUEST_TIMEOUT);
    let err = rt.block_on(pending).unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn connections_are_counted_added_removed_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, path) = uds_muxer(dir.path());
    let metrics = vmm_metrics::VmMetrics::new("t").unwrap();
    let counts = metrics.vsock().unwrap();
    m.set_metrics(counts.clone());
    // Nobody listens on 6000: refused with an RST.
    send(&mut m, OP_REQUEST, 1, 6000, &[]);
    assert_eq!(only(recv_all(&mut m)).0.op, OP_RST);
    assert_eq!(counts.conns_refused.get(), 1);
    assert_eq!(counts.conns_added.get(), 0);

    let listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
    send(&mut m, OP_REQUEST, 1234, 5000, &[]);
    assert_eq!(only(recv_all(&mut m)).0.op, OP_RESPONSE);
    let (host, _) = listener.accept().unwrap();
    assert_eq!(counts.conns_added.get(), 1);
    assert_eq!(counts.conns_removed.get(), 0);
    drop(host);
    assert_eq!(only(pump_recv(&mut m)).0.op, OP_RST);
    assert_eq!(counts.conns_removed.get(), 1);
    assert_eq!(counts.conns_refused.get(), 1);
}
