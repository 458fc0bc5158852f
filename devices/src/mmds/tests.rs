//! The responder driven by hand-built frames and by a second smoltcp stack playing the guest.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use serde_json::json;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpAddress, IpCidr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl,
    TcpPacket, TcpRepr, TcpSeqNumber,
};

use super::http::{handle, Parsed};
use super::intercept::is_for_mmds;
use super::stack::{MAX_CONNECTIONS, MMDS_MAC};
use super::*;

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 2);

fn mmds(version: MmdsVersion) -> SharedMmds {
    let shared = SharedMmds::default();
    {
        let mut m = shared.lock();
        m.store.set_version(version, false);
        m.store
            .put(json!({"latest": {"meta-data": {"ami-id": "ami-12345678"}}}))
            .unwrap();
    }
    shared
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(GUEST_MAC),
        source_protocol_addr: GUEST_IP,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut buf = vec![0; eth.buffer_len() + arp.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf);
    eth.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    buf
}

fn tcp_syn(src_port: u16) -> Vec<u8> {
    tcp_syn_from(GUEST_IP, src_port)
}

fn tcp_syn_from(src_addr: Ipv4Addr, src_port: u16) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port,
        dst_port: 80,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1000),
        ack_number: None,
        window_len: 64000,
        window_scale: None,
        max_seg_size: Some(1460),
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr,
        dst_addr: DEFAULT_IPV4,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(MMDS_MAC),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf);
    eth.emit(&mut frame);
    let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut packet, &Default::default());
    let (src, dst) = (IpAddress::Ipv4(src_addr), IpAddress::Ipv4(DEFAULT_IPV4));
    tcp.emit(
        &mut TcpPacket::new_unchecked(packet.payload_mut()),
        &src,
        &dst,
        &Default::default(),
    );
    buf
}

fn drain(responder: &mut Responder) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| responder.pop_frame()).collect()
}

fn tcp_replies(frames: &[Vec<u8>]) -> Vec<(bool, bool, bool)> {
    frames
        .iter()
        .filter_map(|f| {
            let eth = EthernetFrame::new_checked(f.as_slice()).ok()?;
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            Some((tcp.syn(), tcp.ack(), tcp.rst()))
        })
        .collect()
}

#[test]
fn an_arp_request_for_the_mmds_gets_a_reply() {
    let mut r = Responder::new(DEFAULT_IPV4, mmds(MmdsVersion::V1));
    let request = arp_request(DEFAULT_IPV4);
    assert!(is_for_mmds(&request, DEFAULT_IPV4));
    r.receive(&request);
    let frames = drain(&mut r);
    assert_eq!(frames.len(), 1);
    let eth = EthernetFrame::new_checked(frames[0].as_slice()).unwrap();
    assert_eq!(eth.dst_addr(), EthernetAddress(GUEST_MAC));
    let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
    let ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    } = arp
    else {
        panic!("not an Ethernet/IPv4 ARP packet");
    };
    assert_eq!(operation, ArpOperation::Reply);
    assert_eq!(source_hardware_addr, EthernetAddress(MMDS_MAC));
    assert_eq!(source_protocol_addr, DEFAULT_IPV4);
    assert_eq!(target_protocol_addr, GUEST_IP);
}

#[test]
fn frames_for_other_addresses_are_not_the_mmds() {
    assert!(!is_for_mmds(
        &arp_request(Ipv4Addr::new(10, 0, 0, 1)),
        DEFAULT_IPV4
    ));
    let mut syn = tcp_syn(4000);
    assert!(is_for_mmds(&syn, DEFAULT_IPV4));
    // Destination address 169.254.169.253.
    syn[14 + 19] = 253;
    assert!(!is_for_mmds(&syn, DEFAULT_IPV4));
    assert!(!is_for_mmds(&syn[..20], DEFAULT_IPV4));
    assert!(!is_for_mmds(&[], DEFAULT_IPV4));
}

#[test]
fn a_syn_gets_a_syn_ack_and_connections_are_bounded() {
    let mut r = Responder::new(DEFAULT_IPV4, mmds(MmdsVersion::V1));
    r.receive(&arp_request(DEFAULT_IPV4));
    drain(&mut r);
    for port in 0..MAX_CONNECTIONS as u16 {
        r.receive(&tcp_syn(4000 + port));
        assert_eq!(tcp_replies(&drain(&mut r)), vec![(true, true, false)]);
    }
    // Every socket is taken: the next connection is refused.
    r.receive(&tcp_syn(5000));
    assert_eq!(tcp_replies(&drain(&mut r)), vec![(false, true, true)]);
}

#[test]
fn a_syn_from_an_address_that_cannot_be_answered_is_dropped() {
    // The fuzzer's find: smoltcp took a SYN from 0.0.0.0 and panicked on its SYN-ACK.
    let (mut r, metrics) = counted(MmdsVersion::V1);
    r.receive(&arp_request(DEFAULT_IPV4));
    drain(&mut r);
    let unanswerable = [
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        Ipv4Addr::new(224, 0, 0, 1),
    ];
    for src in unanswerable {
        r.receive(&tcp_syn_from(src, 4000));
        assert!(drain(&mut r).is_empty(), "a reply to {src}");
    }
    assert_eq!(metrics.mmds().rx_accepted_err.get(), 3);
    // The stack still answers the guest.
    r.receive(&tcp_syn(4001));
    assert_eq!(tcp_replies(&drain(&mut r)), vec![(true, true, false)]);
}

/// A queue-backed device for the guest's stack.
#[derive(Default)]
struct Wire {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Wire {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }
    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

static PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// Sends `request` from a guest stack to the responder and returns the whole answer.
fn exchange(r: &mut Responder, request: &str) -> String {
    exchange_with(r, request, false).0
}

/// `exchange`; with `half_close` the guest shuts its side down right after the request (as
/// `nc` does at the end of its input). Also returns how many 50 ms steps it took.
fn exchange_with(r: &mut Responder, request: &str, half_close: bool) -> (String, i64) {
    let mut wire = Wire::default();
    let mut guest = Interface::new(
        Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC))),
        &mut wire,
        Instant::ZERO,
    );
    guest.update_ip_addrs(|a| a.push(IpCidr::new(IpAddress::Ipv4(GUEST_IP), 16)).unwrap());
    let mut sockets = SocketSet::new(vec![]);
    let handle = sockets.add(tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 65536]),
        tcp::SocketBuffer::new(vec![0; 65536]),
    ));
    sockets
        .get_mut::<tcp::Socket>(handle)
        .connect(
            guest.context(),
            (DEFAULT_IPV4, 80),
            // A new local port each time, as a guest's ephemeral ports.
            49152 + PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        )
        .unwrap();
    let mut sent = false;
    let mut answer = Vec::new();
    for step in 0..200 {
        // Coarse steps: the guest stack waits a second before retrying a neighbour it asked for.
        let now = Instant::from_millis(step * 50);
        guest.poll(now, &mut wire, &mut sockets);
        let socket = sockets.get_mut::<tcp::Socket>(handle);
        if socket.can_send() && !sent {
            socket.send_slice(request.as_bytes()).unwrap();
            sent = true;
            if half_close {
                socket.close();
            }
        }
        while socket.can_recv() {
            socket
                .recv(|data| {
                    answer.extend_from_slice(data);
                    (data.len(), ())
                })
                .unwrap();
        }
        if sent && !socket.may_recv() {
            socket.close();
            guest.poll(now, &mut wire, &mut sockets);
            for frame in wire.tx.drain(..) {
                r.receive(&frame);
            }
            return (String::from_utf8(answer).unwrap(), step);
        }
        guest.poll(now, &mut wire, &mut sockets);
        for frame in wire.tx.drain(..) {
            assert!(
                is_for_mmds(&frame, DEFAULT_IPV4),
                "the guest only talks to the MMDS"
            );
            r.receive(&frame);
        }
        wire.rx.extend(std::iter::from_fn(|| r.pop_frame()));
    }
    panic!(
        "no complete answer; got {:?}",
        String::from_utf8_lossy(&answer)
    );
}

fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").unwrap().1
}

#[test]
fn v2_issues_a_token_and_serves_only_with_it() {
    let mut r = Responder::new(DEFAULT_IPV4, mmds(MmdsVersion::V2));
    let answer = exchange(
        &mut r,
        "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        answer.contains("X-metadata-token-ttl-seconds: 60\r\n"),
        "{answer}"
    );
    let token = body(&answer).to_string();
    assert_eq!(token.len(), 44);

    let get = format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
    let answer = exchange(&mut r, &get);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(body(&answer), "ami-12345678");

    let answer = exchange(&mut r, "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    let answer = exchange(
        &mut r,
        "GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    // More connections than the pool holds, one after the other: closed ones are reused.
    for _ in 0..2 * MAX_CONNECTIONS {
        let answer = exchange(&mut r, &get);
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    }
}

#[test]
fn v1_serves_without_a_token_in_both_formats() {
    let mut r = Responder::new(DEFAULT_IPV4, mmds(MmdsVersion::V1));
    let answer = exchange(&mut r, "GET /latest/meta-data HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(body(&answer), "ami-id");
    let answer = exchange(
        &mut r,
        "GET /latest HTTP/1.1\r\nAccept: application/json\r\n\r\n",
    );
    assert!(
        answer.contains("Content-Type: application/json\r\n"),
        "{answer}"
    );
    assert_eq!(body(&answer), r#"{"meta-data":{"ami-id":"ami-12345678"}}"#);
    let answer = exchange(&mut r, "GET /nope HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
}

fn answer_to(version: MmdsVersion, request: &str) -> String {
    let shared = mmds(version);
    let mut m = shared.lock();
    match handle(&mut m, request.as_bytes(), now()) {
        Parsed::Response(bytes) => String::from_utf8(bytes).unwrap(),
        Parsed::Incomplete => "incomplete".to_string(),
    }
}

#[test]
fn http_errors_match_firecracker() {
    let v2 = MmdsVersion::V2;
    assert_eq!(answer_to(v2, "GET /latest HTTP/1.1\r\n"), "incomplete");
    assert!(answer_to(v2, "DELETE /latest HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
    assert!(answer_to(MmdsVersion::V1, "POST / HTTP/1.1\r\n\r\n").contains("Allow: GET, PUT\r\n"));
    assert!(answer_to(v2, "PUT /latest/api/token HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 400 "));
    let zero = "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 0\r\n\r\n";
    assert!(answer_to(v2, zero).starts_with("HTTP/1.1 400 "));
    let big = "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 21601\r\n\r\n";
    assert!(answer_to(v2, big).starts_with("HTTP/1.1 400 "));
    let nan = "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: x\r\n\r\n";
    assert!(answer_to(v2, nan).starts_with("HTTP/1.1 400 "));
    let fwd = "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\nX-Forwarded-For: a\r\n\r\n";
    assert!(answer_to(v2, fwd).starts_with("HTTP/1.1 400 "));
    let elsewhere = "PUT /latest/other HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n";
    assert!(answer_to(v2, elsewhere).starts_with("HTTP/1.1 404 "));
    assert!(answer_to(v2, "GARBAGE\r\n\r\n").starts_with("HTTP/1.1 400 "));
    let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(5000));
    assert!(answer_to(v2, &long).starts_with("HTTP/1.1 400 "));
    // V1 takes a GET with or without a token, valid or not (Firecracker only counts them).
    let with_token = "GET //latest//meta-data/ami-id HTTP/1.0\r\nX-metadata-token: bogus\r\n\r\n";
    let answer = answer_to(MmdsVersion::V1, with_token);
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
}

#[test]
fn an_answer_needs_no_timer_even_when_the_guest_half_closes_first() {
    let mut r = Responder::new(DEFAULT_IPV4, mmds(MmdsVersion::V1));
    for half_close in [false, true, true] {
        let (answer, steps) = exchange_with(
            &mut r,
            "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n",
            half_close,
        );
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        // Handshake, request, answer: a few polls, no retransmission (its timer is >= 1 s).
        assert!(
            steps < 10,
            "{steps} steps of 50 ms (half_close {half_close})"
        );
    }
}

fn counted(version: MmdsVersion) -> (Responder, vmm_metrics::VmMetrics) {
    let metrics = vmm_metrics::VmMetrics::new("").unwrap();
    let mut r = Responder::new(DEFAULT_IPV4, mmds(version));
    r.set_metrics(metrics.mmds().clone());
    (r, metrics)
}

#[test]
fn the_mmds_counters_follow_v2_exchanges() {
    let (mut r, metrics) = counted(MmdsVersion::V2);
    let m = metrics.mmds();
    let answer = exchange(
        &mut r,
        "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
    );
    let token = body(&answer).to_string();
    assert_eq!(m.requests_count.get(), 1);
    assert_eq!(m.connections_created.get(), 1);
    assert_eq!(m.rx_no_token.get() + m.rx_invalid_token.get(), 0);
    let rx = m.rx_accepted.get();
    // ARP, SYN, ACK, request, ACKs, FIN at least.
    assert!(rx >= 4, "{rx}");
    let (frames, bytes) = (m.tx_frames.get(), m.tx_bytes.get());
    // ARP reply, SYN-ACK, the answer, FIN at least; each at least an Ethernet and IPv4 header.
    assert!(frames >= 4, "{frames}");
    assert!(bytes >= frames * 42 + answer.len() as u64, "{bytes}");

    let get = format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
    assert!(exchange(&mut r, &get).starts_with("HTTP/1.1 200 OK\r\n"));
    assert_eq!(m.rx_no_token.get() + m.rx_invalid_token.get(), 0);
    let answer = exchange(&mut r, "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    assert_eq!(m.rx_no_token.get(), 1);
    let answer = exchange(
        &mut r,
        "GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    assert_eq!(m.rx_invalid_token.get(), 1);
    assert_eq!(m.rx_no_token.get(), 1);
    // More connections than the pool: each counted once, and each gone when it ends.
    for _ in 0..2 * MAX_CONNECTIONS {
        assert!(exchange(&mut r, &get).starts_with("HTTP/1.1 200 OK\r\n"));
    }
    let n = 4 + 2 * MAX_CONNECTIONS as u64;
    assert_eq!(m.requests_count.get(), n);
    assert_eq!(m.connections_created.get(), n);
    assert_eq!(m.connections_destroyed.get(), n);
    assert!(m.rx_accepted.get() > rx && m.tx_frames.get() > frames);
    assert_eq!(m.rx_accepted_err.get(), 0);
    assert_eq!(m.tx_errors.get(), 0);
    // What the net device sees as the MMDS's is what the responder counted.
    assert_eq!(m.tx_frames.get(), {
        let line = vmm_metrics::json::Flusher::new().line(&metrics, 0);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["mmds"]["tx_frames"].as_u64().unwrap()
    });
}

#[test]
fn v1_counts_tokenless_gets_it_serves_and_oversize_frames() {
    let (mut r, metrics) = counted(MmdsVersion::V1);
    let m = metrics.mmds();
    let answer = exchange(&mut r, "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(m.rx_no_token.get(), 1);
    let answer = exchange(
        &mut r,
        "GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: bogus\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(m.rx_invalid_token.get(), 1);
    // A PUT is no GET: nothing about tokens counted.
    exchange(&mut r, "PUT /latest/api/token HTTP/1.1\r\n\r\n");
    assert_eq!(m.rx_no_token.get(), 1);
    assert_eq!(m.requests_count.get(), 3);

    // The last exchange's final replies are still queued.
    drain(&mut r);
    let rx = m.rx_accepted.get();
    let mut gso = tcp_syn(4000);
    gso.resize(64 * 1024, 0);
    r.receive(&gso);
    assert_eq!(m.rx_accepted.get(), rx + 1);
    assert_eq!(m.rx_accepted_err.get(), 1);
    assert!(drain(&mut r).is_empty());
}

#[test]
fn a_full_guest_queue_counts_dropped_replies() {
    let (mut r, metrics) = counted(MmdsVersion::V1);
    r.receive(&arp_request(DEFAULT_IPV4));
    drain(&mut r);
    // Every SYN over the pool gets a RST; the guest never reads them.
    for port in 0..(MAX_CONNECTIONS + super::stack::MAX_PENDING_FRAMES + 5) as u16 {
        r.receive(&tcp_syn(4000 + port));
    }
    let m = metrics.mmds();
    assert_eq!(m.connections_created.get(), MAX_CONNECTIONS as u64);
    assert_eq!(m.tx_frames.get(), 1);
    assert!(m.tx_errors.get() > 0, "{}", m.tx_errors.get());
}
