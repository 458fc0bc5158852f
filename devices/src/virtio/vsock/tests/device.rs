//! The device through its virtqueues (mock guest driver) and the real event manager.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::driver::{Driver, Layout, HDR};
use super::support::{hdr, GUEST_CID};
use crate::interrupt::CountingLine;
use crate::persist::Persist;
use crate::virtio::vsock::config::{BackendChoice, Datapath, VsockConfig};
use crate::virtio::vsock::defs::*;
use crate::virtio::vsock::header::Header;
use crate::virtio::vsock::{Vsock, VsockConstructorArgs, VsockError, VsockState};
use crate::virtio::{ActivateError, ActivationContext, VirtioDevice, VirtioInterrupt};

type Em = EventManager<Arc<Mutex<Vsock>>>;

struct Rig {
    dev: Arc<Mutex<Vsock>>,
    em: Em,
    driver: Driver,
    kicks: Vec<EventFd>,
    line: Arc<CountingLine>,
}

fn activation(driver: &Driver) -> (ActivationContext, Vec<EventFd>, Arc<CountingLine>) {
    let kicks: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let line = Arc::new(CountingLine::default());
    let ctx = ActivationContext {
        mem: driver.mem.clone(),
        acked_features: 1 << 32,
        queues: (0..3).map(|q| driver.queue(q)).collect(),
        queue_events: kicks.iter().map(|e| e.try_clone().unwrap()).collect(),
        interrupt: Arc::new(VirtioInterrupt::new(line.clone())),
    };
    (ctx, kicks, line)
}

fn rig_with(config: VsockConfig) -> Rig {
    let dev = Arc::new(Mutex::new(Vsock::with_vhost_probe(config, false).unwrap()));
    let mut em = Em::new().unwrap();
    em.add_subscriber(dev.clone());
    let driver = Driver::new(3, 256);
    let (ctx, kicks, line) = activation(&driver);
    dev.lock().unwrap().activate(ctx).unwrap();
    let mut rig = Rig {
        dev,
        em,
        driver,
        kicks,
        line,
    };
    rig.pump();
    rig
}

fn rig() -> Rig {
    rig_with(VsockConfig::new(GUEST_CID).unwrap())
}

impl Rig {
    fn pump(&mut self) {
        // Drain whatever is ready; a short timeout lets host sockets deliver.
        for _ in 0..4 {
            self.em.run_with_timeout(5).unwrap();
        }
    }

    fn send(&mut self, h: Header, data: &[u8], layout: Layout) {
        let mut h = h;
        h.len = data.len() as u32;
        self.driver.send(TXQ, &h.to_bytes(), data, layout);
        self.kicks[TXQ].write(1).unwrap();
        self.pump();
    }

    fn post_rx(&mut self, n: usize, layout: Layout) {
        for _ in 0..n {
            self.driver.post_rx(RXQ, 4096, layout);
        }
        self.kicks[RXQ].write(1).unwrap();
        self.pump();
    }

    fn rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.driver
            .take_rx(RXQ)
            .into_iter()
            .map(|(h, d)| (Header::from_bytes(&h), d))
            .collect()
    }

    /// Pumps until the guest got packets (host sockets are asynchronous).
    fn rx_wait(&mut self) -> Vec<(Header, Vec<u8>)> {
        for _ in 0..500 {
            let got = self.rx();
            if !got.is_empty() {
                return got;
            }
            self.pump();
        }
        panic!("no RX packet arrived");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn config_space_features_and_queues() {
    let dev = Vsock::with_vhost_probe(VsockConfig::new(0x0102_0304).unwrap(), false).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_ne!(dev.device_features() & (1 << 32), 0);
    let mut buf = [0xffu8; 8];
    dev.read_config(0, &mut buf);
    assert_eq!(u64::from_le_bytes(buf), 0x0102_0304);
    let mut buf = [0xffu8; 8];
    dev.read_config(2, &mut buf);
    assert_eq!(buf, [0x02, 0x01, 0, 0, 0, 0, 0, 0]);
    let mut buf = [0xffu8; 4];
    dev.read_config(u64::MAX, &mut buf);
    assert_eq!(buf, [0; 4]);
    assert_eq!(dev.datapath(), Datapath::Userspace);
}

#[test]
fn activation_checks_queue_count_and_double_activation() {
    let mut dev = Vsock::with_vhost_probe(VsockConfig::new(GUEST_CID).unwrap(), false).unwrap();
    let driver = Driver::new(3, 64);
    let (mut ctx, _, _) = activation(&driver);
    ctx.queues.pop();
    assert!(matches!(
        dev.activate(ctx),
        Err(ActivateError::QueueCount {
            expected: 3,
            got: 2
        })
    ));
    assert!(!dev.is_active());
    let (ctx, _, _) = activation(&driver);
    dev.activate(ctx).unwrap();
    let (ctx, _, _) = activation(&driver);
    assert!(matches!(
        dev.activate(ctx),
        Err(ActivateError::AlreadyActive)
    ));
}

#[test]
fn guest_connects_to_in_process_listener_in_both_layouts() {
    let rt = runtime();
    for layout in [Layout::Single, Layout::Split] {
        let mut r = rig();
        let handle = r.dev.lock().unwrap().handle();
        let mut listener = handle.listen(7000).unwrap();
        r.post_rx(8, layout);
        r.send(hdr(OP_REQUEST, 1234, 7000), &[], layout);
        let pkts = r.rx();
        assert_eq!(pkts.len(), 1, "{layout:?}");
        assert_eq!(pkts[0].0.op, OP_RESPONSE);
        assert_eq!(
            (pkts[0].0.src_cid, pkts[0].0.dst_cid),
            (HOST_CID, GUEST_CID)
        );
        let (mut stream, port) = rt.block_on(listener.accept()).unwrap();
        assert_eq!(port, 1234);
        r.send(hdr(OP_RW, 1234, 7000), b"hello", layout);
        let mut buf = [0u8; 5];
        rt.block_on(stream.read_exact(&mut buf)).unwrap();
        assert_eq!(&buf, b"hello");
        rt.block_on(stream.write_all(b"world")).unwrap();
        let pkts = r.rx_wait();
        assert_eq!((pkts[0].0.op, pkts[0].1.as_slice()), (OP_RW, &b"world"[..]));
        assert_eq!(pkts[0].0.len, 5);
        assert!(r.line.0.load(Ordering::SeqCst) > 0, "guest was interrupted");
        assert_eq!(r.dev.lock().unwrap().connection_count(), 1);
    }
}

/// Linux 6.x sends a large payload as page fragments: one header descriptor and a data
/// descriptor per page. The device must gather them all (it used to reset the connection).
#[test]
fn tx_payload_spread_over_many_descriptors_arrives_whole() {
    let rt = runtime();
    let mut r = rig();
    let handle = r.dev.lock().unwrap().handle();
    let mut listener = handle.listen(7001).unwrap();
    r.post_rx(8, Layout::Split);
    r.send(hdr(OP_REQUEST, 1234, 7001), &[], Layout::Split);
    assert_eq!(r.rx()[0].0.op, OP_RESPONSE);
    let (mut stream, _) = rt.block_on(listener.accept()).unwrap();

    let payload: Vec<u8> = (0..9000u32).map(|i| (i % 251) as u8).collect();
    let base = r.driver.next_slot_addr(TXQ).0 + 0x8000;
    let mut h = hdr(OP_RW, 1234, 7001);
    h.len = payload.len() as u32;
    let mem = r.driver.mem.clone();
    mem.write_slice(&h.to_bytes(), GuestAddress(base)).unwrap();
    // Fragments of 4096, 4096 and 808 bytes at scattered addresses.
    let frags = [
        (0x1000u64, 0..4096),
        (0x3000, 4096..8192),
        (0x6000, 8192..9000),
    ];
    let mut descs = vec![(base, HDR as u32, 0)];
    for (off, range) in frags {
        mem.write_slice(&payload[range.clone()], GuestAddress(base + off))
            .unwrap();
        descs.push((base + off, range.len() as u32, 0));
    }
    r.driver.push_raw_chain(TXQ, &descs);
    // And the >= 6.2 variant: the header shares the first descriptor with the first bytes.
    let base2 = base + 0x7000;
    mem.write_slice(&h.to_bytes(), GuestAddress(base2)).unwrap();
    mem.write_slice(&payload[..100], GuestAddress(base2 + HDR as u64))
        .unwrap();
    mem.write_slice(&payload[100..], GuestAddress(base2 + 0x100))
        .unwrap();
    r.driver.push_raw_chain(
        TXQ,
        &[
            (base2, HDR as u32 + 100, 0),
            (base2 + 0x100, payload.len() as u32 - 100, 0),
        ],
    );
    r.kicks[TXQ].write(1).unwrap();
    r.pump();
    assert!(
        r.rx().iter().all(|(h, _)| h.op != OP_RST),
        "no reset for a scattered payload"
    );
    let mut got = vec![0u8; 2 * payload.len()];
    rt.block_on(stream.read_exact(&mut got)).unwrap();
    assert_eq!(&got[..payload.len()], &payload[..]);
    assert_eq!(&got[payload.len()..], &payload[..]);
}

#[test]
fn host_initiated_uds_connection_through_device() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut config = VsockConfig::new(GUEST_CID).unwrap();
    config.uds_path = Some(path.clone());
    let mut r = rig_with(config);
    r.post_rx(4, Layout::Single);
    let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let pkts = r.rx_wait();
    assert_eq!((pkts[0].0.op, pkts[0].0.dst_port), (OP_REQUEST, 52));
    let local = pkts[0].0.src_port;
    r.send(hdr(OP_RESPONSE, 52, local), &[], Layout::Single);
    let mut ok = vec![0u8; format!("OK {local}\n").len()];
    client.read_exact(&mut ok).unwrap();
    assert_eq!(ok, format!("OK {local}\n").as_bytes());
    drop(client);
    let pkts = r.rx_wait();
    assert_eq!(pkts[0].0.op, OP_RST);
}

#[test]
fn malformed_descriptors_never_panic() {
    let mut r = rig();
    r.post_rx(16, Layout::Split);
    let base = r.driver.next_slot_addr(TXQ).0 + 0x8000;
    let header = hdr(OP_REQUEST, 1, 5555).to_bytes();
    r.driver
        .mem
        .write_slice(&header, GuestAddress(base))
        .unwrap();
    // Device-writable TX descriptor.
    r.driver.push_raw_chain(TXQ, &[(base, HDR as u32, 2)]);
    // Header descriptor shorter than a header.
    r.driver.push_raw_chain(TXQ, &[(base, 10, 0)]);
    // Descriptor outside guest memory.
    r.driver.push_raw_chain(TXQ, &[(u64::MAX - 8, 64, 0)]);
    r.driver.push_raw_chain(TXQ, &[(0xffff_ffff_0000, 64, 0)]);
    // Zero-length descriptor.
    r.driver.push_raw_chain(TXQ, &[(base, 0, 0)]);
    r.kicks[TXQ].write(1).unwrap();
    r.pump();
    assert_eq!(r.driver.take_used(TXQ).len(), 5, "every chain is returned");
    // Oversized payload: the readable header earns an RST.
    let mut big = hdr(OP_RW, 1, 5555);
    big.len = MAX_PKT_DATA + 1;
    r.driver
        .mem
        .write_slice(&big.to_bytes(), GuestAddress(base))
        .unwrap();
    r.driver
        .push_raw_chain(TXQ, &[(base, HDR as u32 + MAX_PKT_DATA + 1, 0)]);
    // Header says 100 bytes, data descriptor holds 10.
    let mut short = hdr(OP_RW, 1, 5555);
    short.len = 100;
    r.driver
        .mem
        .write_slice(&short.to_bytes(), GuestAddress(base + 0x100))
        .unwrap();
    r.driver
        .push_raw_chain(TXQ, &[(base + 0x100, HDR as u32, 0), (base + 0x200, 10, 0)]);
    r.kicks[TXQ].write(1).unwrap();
    r.pump();
    let rsts = r.rx();
    assert_eq!(rsts.len(), 2);
    assert!(rsts.iter().all(|(h, _)| h.op == OP_RST && h.dst_port == 1));
    // Read-only RX buffers are consumed with nothing written, and the device keeps going.
    r.driver.push_raw_chain(RXQ, &[(base, 4096, 0)]);
    r.kicks[RXQ].write(1).unwrap();
    r.send(hdr(OP_RW, 9, 9), b"?", Layout::Single);
    let pkts = r.rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    assert!(r.dev.lock().unwrap().is_active());
}

#[test]
fn transport_reset_event_after_reset_all_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_80", path.display())).unwrap();
    let mut config = VsockConfig::new(GUEST_CID).unwrap();
    config.uds_path = Some(path);
    let mut r = rig_with(config);
    r.post_rx(4, Layout::Single);
    r.send(hdr(OP_REQUEST, 1, 80), &[], Layout::Single);
    let (mut host, _) = listener.accept().unwrap();
    // Event buffer first, then the reset.
    let ev_addr = r.driver.next_slot_addr(EVQ);
    r.driver.mem.write_obj(0xffff_ffffu32, ev_addr).unwrap();
    r.driver.push_raw_chain(EVQ, &[(ev_addr.0, 4, 2)]);
    r.kicks[EVQ].write(1).unwrap();
    r.pump();
    assert!(
        r.driver.take_used(EVQ).is_empty(),
        "no event without a reset"
    );
    r.dev.lock().unwrap().reset_all_connections();
    assert_eq!(r.driver.take_used(EVQ), vec![(0, 4)]);
    let id: u32 = r.driver.mem.read_obj(ev_addr).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0, "host side closed");
    assert_eq!(r.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn device_reset_closes_connections_and_reactivates() {
    let rt = runtime();
    let mut r = rig();
    let handle = r.dev.lock().unwrap().handle();
    let mut listener = handle.listen(80).unwrap();
    r.post_rx(4, Layout::Single);
    r.send(hdr(OP_REQUEST, 1, 80), &[], Layout::Single);
    let (mut stream, _) = rt.block_on(listener.accept()).unwrap();
    r.dev.lock().unwrap().reset();
    assert!(!r.dev.lock().unwrap().is_active());
    let mut rest = Vec::new();
    assert_eq!(rt.block_on(stream.read_to_end(&mut rest)).unwrap(), 0);
    r.pump();
    // Kicks on the old queues are ignored (and unregistered).
    r.kicks[TXQ].write(1).unwrap();
    r.pump();
    // Guest reboots: a fresh driver activates the device again.
    let driver = Driver::new(3, 64);
    let (ctx, kicks, _) = activation(&driver);
    r.driver = driver;
    r.kicks = kicks;
    r.dev.lock().unwrap().activate(ctx).unwrap();
    r.pump();
    r.post_rx(4, Layout::Single);
    r.send(hdr(OP_REQUEST, 2, 80), &[], Layout::Single);
    assert_eq!(r.rx()[0].0.op, OP_RESPONSE);
}

#[test]
fn saved_state_round_trips_and_restore_announces_transport_reset() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = VsockConfig::new(GUEST_CID).unwrap();
    config.uds_path = Some(dir.path().join("v.sock"));
    config.backend = BackendChoice::Userspace;
    let state = {
        let r = rig_with(config.clone());
        let s = r.dev.lock().unwrap().save();
        s
    };
    assert_eq!(state.config, config);
    assert_eq!(state.acked_features, 1 << 32);
    let json = serde_json::to_string(&state).unwrap();
    let back: VsockState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    let dev = Arc::new(Mutex::new(
        Vsock::restore(VsockConstructorArgs::default(), &back).unwrap(),
    ));
    let mut em = Em::new().unwrap();
    em.add_subscriber(dev.clone());
    let mut driver = Driver::new(3, 64);
    let ev_addr = driver.next_slot_addr(EVQ);
    driver.push_raw_chain(EVQ, &[(ev_addr.0, 8, 2)]);
    let (ctx, _kicks, _) = activation(&driver);
    dev.lock().unwrap().activate(ctx).unwrap();
    for _ in 0..4 {
        em.run_with_timeout(5).unwrap();
    }
    assert_eq!(driver.take_used(EVQ), vec![(0, 4)]);
}

#[test]
fn vhost_selection_and_unsupported_handle() {
    let mut config = VsockConfig::new(GUEST_CID).unwrap();
    config.backend = BackendChoice::Vhost;
    assert!(Vsock::with_vhost_probe(config.clone(), false).is_err());
    // Pretend the probe succeeded: the device runs on vhost, and activation reports the
    // missing /dev/vhost-vsock instead of silently running without a datapath.
    let mut dev = Vsock::with_vhost_probe(config, true).unwrap();
    assert_eq!(dev.datapath(), Datapath::Vhost);
    let err = runtime().block_on(dev.handle().connect(1)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::Unsupported);
    let driver = Driver::new(3, 64);
    let (ctx, _, _) = activation(&driver);
    if !std::path::Path::new("/dev/vhost-vsock").exists() {
        assert!(matches!(dev.activate(ctx), Err(ActivateError::Backend(_))));
        assert!(!dev.is_active());
    }
}

#[test]
fn host_flood_into_large_rx_buffers_keeps_lengths_consistent() {
    let mut r = rig();
    let handle = r.dev.lock().unwrap().handle();
    let rt = runtime();
    let mut listener = handle.listen(80).unwrap();
    let mut req = hdr(OP_REQUEST, 1, 80);
    req.buf_alloc = 1 << 20;
    r.post_rx(1, Layout::Single);
    r.send(req, &[], Layout::Single);
    assert_eq!(r.rx()[0].0.op, OP_RESPONSE);
    let (stream, _) = rt.block_on(listener.accept()).unwrap();
    let mut host = stream.into_std().unwrap();
    host.set_nonblocking(false).unwrap();
    let writer = std::thread::spawn(move || {
        let buf = vec![7u8; 1 << 20];
        for _ in 0..4 {
            if host.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut received = 0usize;
    let mut outstanding = 0;
    while received < 4 << 20 {
        while outstanding < 64 {
            r.driver.post_rx(RXQ, MAX_PKT_DATA, Layout::Single);
            outstanding += 1;
        }
        r.dev.lock().unwrap().handle_host_events();
        for (h, data) in r.rx() {
            outstanding -= 1;
            assert_eq!(h.len as usize, data.len(), "{h:?}");
            assert!(data.iter().all(|b| *b == 7));
            received += data.len();
        }
        let mut upd = hdr(OP_CREDIT_UPDATE, 1, 80);
        upd.buf_alloc = 1 << 20;
        upd.fwd_cnt = received as u32;
        r.driver.send(TXQ, &upd.to_bytes(), &[], Layout::Single);
        r.dev.lock().unwrap().handle_tx_kick();
        r.driver.take_used(TXQ);
        for (h, data) in r.rx() {
            outstanding -= 1;
            assert_eq!(h.len as usize, data.len(), "{h:?}");
            received += data.len();
        }
    }
    assert_eq!(received, 4 << 20);
    writer.join().unwrap();
}

#[test]
fn restore_of_save_round_trips_and_applies_host_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = VsockConfig::new(GUEST_CID).unwrap();
    config.uds_path = Some(dir.path().join("v.sock"));
    config.backend = BackendChoice::Userspace;
    let state = {
        let r = rig_with(config.clone());
        let s = r.dev.lock().unwrap().save();
        s
    };
    let restored = Vsock::restore(VsockConstructorArgs::default(), &state).unwrap();
    assert_eq!(restored.save(), state);
    drop(restored);

    let other = dir.path().join("w.sock");
    let args = VsockConstructorArgs {
        guest_cid: Some(GUEST_CID + 1),
        uds_path: Some(other.clone()),
    };
    let clone = Vsock::restore(args, &state).unwrap();
    let saved = clone.save();
    assert_eq!(saved.config.guest_cid, GUEST_CID + 1);
    assert_eq!(saved.config.uds_path, Some(other));
    assert_eq!(saved.acked_features, state.acked_features);
    assert_eq!(saved.next_local_port, state.next_local_port);
}

#[test]
fn restore_of_a_bad_state_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = VsockConfig::new(GUEST_CID).unwrap();
    config.backend = BackendChoice::Userspace;
    let good = VsockState {
        config,
        datapath: Datapath::Userspace,
        avail_features: 1 << 32,
        acked_features: 1 << 32,
        next_local_port: None,
    };
    let mut bad_cid = good.clone();
    bad_cid.config.guest_cid = 2; // the host's CID
    assert!(matches!(
        Vsock::restore(VsockConstructorArgs::default(), &bad_cid),
        Err(VsockError::Config(_))
    ));
    let override_cid = VsockConstructorArgs {
        guest_cid: Some(u64::MAX),
        uds_path: None,
    };
    assert!(Vsock::restore(override_cid, &good).is_err());
    let mut vhost_with_uds = good.clone();
    vhost_with_uds.config.backend = BackendChoice::Vhost;
    vhost_with_uds.config.uds_path = Some(dir.path().join("v.sock"));
    assert!(matches!(
        Vsock::restore(VsockConstructorArgs::default(), &vhost_with_uds),
        Err(VsockError::Config(_))
    ));
    let unbindable = VsockConstructorArgs {
        guest_cid: None,
        uds_path: Some(dir.path().join("missing-dir").join("v.sock")),
    };
    assert!(Vsock::restore(unbindable, &good).is_err());
}

#[test]
fn after_a_restore_rx_waits_until_the_guest_handled_the_transport_reset() {
    // The guest resets every connected socket when it handles the reset event: a connection it
    // accepted before that would die on its side only. So a host connection made right after a
    // restore reaches the guest once it kicked the event queue, on a port the snapshot's
    // connections never used.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let mut config = VsockConfig::new(GUEST_CID).unwrap();
    config.uds_path = Some(path.clone());
    config.backend = BackendChoice::Userspace;
    let mut state = {
        let r = rig_with(config);
        let s = r.dev.lock().unwrap().save();
        s
    };
    assert_eq!(state.next_local_port, Some(LOCAL_PORT_BASE));
    state.next_local_port = Some(LOCAL_PORT_BASE + 7);
    let dev = Arc::new(Mutex::new(
        Vsock::restore(VsockConstructorArgs::default(), &state).unwrap(),
    ));
    let mut em = Em::new().unwrap();
    em.add_subscriber(dev.clone());
    let mut driver = Driver::new(3, 256);
    let ev_addr = driver.next_slot_addr(EVQ);
    driver.push_raw_chain(EVQ, &[(ev_addr.0, 8, 2)]);
    let (ctx, kicks, line) = activation(&driver);
    dev.lock().unwrap().activate(ctx).unwrap();
    let mut r = Rig {
        dev,
        em,
        driver,
        kicks,
        line,
    };
    r.pump();
    assert_eq!(r.driver.take_used(EVQ), vec![(0, 4)]);
    r.post_rx(4, Layout::Single);
    let mut host = std::os::unix::net::UnixStream::connect(&path).unwrap();
    host.write_all(b"CONNECT 80\n").unwrap();
    for _ in 0..25 {
        r.pump();
    }
    assert!(
        r.rx().is_empty(),
        "nothing reaches the guest before it handled the reset"
    );
    // The guest handled the event and re-posted its buffer.
    r.driver.push_raw_chain(EVQ, &[(ev_addr.0, 8, 2)]);
    r.kicks[EVQ].write(1).unwrap();
    let pkts = r.rx_wait();
    assert_eq!(pkts[0].0.op, OP_REQUEST);
    assert_eq!(pkts[0].0.src_port, LOCAL_PORT_BASE + 7);
    assert_eq!(pkts[0].0.dst_port, 80);
}
