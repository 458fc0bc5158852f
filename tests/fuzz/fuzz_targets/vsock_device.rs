//! The virtio-vsock device on its userspace datapath: arbitrary descriptor tables and available
//! rings on the RX, TX and event queues (TX chains parsed into header + payload and handed to
//! the muxer; RX chains filled with packets for the guest; event buffers for transport resets),
//! with in-process host listeners and host-initiated connections, guest-memory writes between
//! kicks, ring indices moved on (so rings wrap and chains are reused) and connection resets.

#![no_main]

use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use devices::interrupt::CountingLine;
use devices::virtio::vsock::{Vsock, VsockConfig};
use devices::virtio::{ActivationContext, VirtioDevice, VirtioInterrupt};
use devices_fuzz::{fuzzed_queue, guest_memory, ring_base, Input, MEM_END};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const GUEST_CID: u64 = 3;
/// Where payload bytes go (after the three queues' rings).
const PAYLOAD_BASE: u64 = 0xa000;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mem = guest_memory();
    let queues: Vec<_> = (0..3).map(|q| fuzzed_queue(&mut input, &mem, q)).collect();
    let payload_len = usize::from(input.u16() % 0x6000);
    let _ = mem.write_slice(input.take(payload_len), GuestAddress(PAYLOAD_BASE));

    let config = VsockConfig::new(GUEST_CID).expect("valid CID");
    let mut dev = Vsock::with_vhost_probe(config, false).expect("userspace vsock");
    let handle = dev.handle();
    // Guest connections to ports 1 and 2 reach a listener (never accepted: the streams sit in
    // its backlog and fill up); other ports are refused.
    let _listeners: Vec<_> = [1, 2]
        .iter()
        .filter_map(|&p| handle.listen(p).ok())
        .collect();
    let ctx = ActivationContext {
        mem: mem.clone(),
        acked_features: 1 << 32,
        queues,
        queue_events: (0..3).map(|_| EventFd::new(0).expect("eventfd")).collect(),
        interrupt: Arc::new(VirtioInterrupt::new(Arc::new(CountingLine(
            AtomicUsize::new(0),
        )))),
    };
    dev.activate(ctx).expect("activation with valid queues");

    let mut host_ends: Vec<UnixStream> = Vec::new();
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        match input.u8() % 12 {
            0..=2 => dev.handle_tx_kick(),
            3 => dev.handle_rx_kick(),
            4 => dev.handle_event_kick(),
            5 => dev.handle_host_events(),
            6 => {
                let offset = input.u64() % MEM_END;
                let len = usize::from(input.u8());
                let _ = mem.write_slice(input.take(len), GuestAddress(offset));
            }
            7 => {
                // The driver makes more chains available: move the avail index on.
                let q = u64::from(input.u8() % 3);
                let at = GuestAddress(ring_base(q) + 0x1000 + 2);
                let idx: u16 = mem.read_obj(at).unwrap_or(0);
                let _ = mem.write_obj(idx.wrapping_add(u16::from(input.u8())), at);
            }
            8 => {
                let port = input.u32() % 4;
                if let Ok((ours, theirs)) = UnixStream::pair() {
                    let _ = ours.set_nonblocking(true);
                    if handle.connect_stream(theirs, port, |_| {}).is_ok() {
                        host_ends.push(ours);
                    }
                }
            }
            9 => {
                let which = usize::from(input.u8());
                let len = usize::from(input.u16() % 9000);
                let n = host_ends.len().max(1);
                if let Some(end) = host_ends.get_mut(which % n) {
                    let _ = std::io::Write::write(end, &vec![0x5a; len]);
                }
            }
            10 => {
                if !host_ends.is_empty() {
                    let which = usize::from(input.u8()) % host_ends.len();
                    host_ends.swap_remove(which);
                }
            }
            _ => dev.reset_all_connections(),
        }
    }
    assert!(
        dev.is_active(),
        "only a transport reset deactivates the device"
    );
    dev.reset();
    assert!(!dev.is_active());
    assert_eq!(dev.connection_count(), 0);
});
