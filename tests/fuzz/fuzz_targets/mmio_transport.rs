//! The virtio-mmio transport driven by an arbitrary sequence of register reads and writes
//! (any offset, any access size, any value) in front of a real virtio-blk device, interleaved
//! with guest-memory writes, event-loop passes (so an activated device processes whatever rings
//! the sequence set up) and snapshot save/restore round trips.

#![no_main]

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::interrupt::CountingLine;
use devices::persist::Persist;
use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioTransport, MmioTransportArgs};
use devices::virtio::{VirtioDevice, VirtioInterrupt};
use devices_fuzz::{guest_memory, memfd_disk, Input, MEM_END};
use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

// Register offsets used by the init shortcut (virtio spec 1.2, 4.2.2).
const DEVICE_FEATURES_SEL: u64 = 0x14;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const STATUS: u64 = 0x70;
const QUEUE_DESC_LOW: u64 = 0x80;
const QUEUE_DRIVER_LOW: u64 = 0x90;
const QUEUE_DEVICE_LOW: u64 = 0xa0;

type Manager = EventManager<Arc<Mutex<Block>>>;

struct Rig {
    mem: devices::GuestMemory,
    manager: Manager,
    block: Arc<Mutex<Block>>,
    transport: MmioTransport,
    read_only: bool,
}

fn new_block(read_only: bool) -> Arc<Mutex<Block>> {
    let disk = memfd_disk(64 * 1024, read_only);
    Arc::new(Mutex::new(Block::from_disk(disk).expect("block device")))
}

fn interrupt() -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(Arc::new(CountingLine(
        AtomicUsize::new(0),
    ))))
}

impl Rig {
    fn new(read_only: bool) -> Self {
        let mem = guest_memory();
        let block = new_block(read_only);
        let mut manager = Manager::new().expect("epoll");
        manager.add_subscriber(block.clone());
        let transport =
            MmioTransport::new(block.clone(), mem.clone(), interrupt()).expect("transport");
        Self {
            mem,
            manager,
            block,
            transport,
            read_only,
        }
    }

    fn write32(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// The driver's initialisation sequence with fuzzed features and ring addresses, so that
    /// inputs reach an active device without having to discover the whole protocol.
    fn init_shortcut(&mut self, input: &mut Input) {
        self.write32(STATUS, 1);
        self.write32(STATUS, 3);
        let features = input.u64();
        self.write32(DEVICE_FEATURES_SEL, 0);
        self.write32(DRIVER_FEATURES_SEL, 0);
        self.write32(DRIVER_FEATURES, features as u32);
        self.write32(DRIVER_FEATURES_SEL, 1);
        // VERSION_1 (bit 32) always, so FEATURES_OK is normally accepted.
        self.write32(DRIVER_FEATURES, (features >> 32) as u32 | 1);
        self.write32(STATUS, 0xb);
        self.write32(QUEUE_SEL, 0);
        self.write32(QUEUE_NUM, u32::from(input.u16() % 257));
        let base = u32::from(input.u16()) % (MEM_END as u32);
        self.write32(QUEUE_DESC_LOW, base);
        self.write32(QUEUE_DRIVER_LOW, base.wrapping_add(0x1000));
        self.write32(QUEUE_DEVICE_LOW, base.wrapping_add(0x2000));
        self.write32(QUEUE_READY, 1);
        self.write32(STATUS, 0xf);
    }

    /// Saves the transport and restores it in front of a fresh device, as a snapshot would.
    fn snapshot_round_trip(&mut self) {
        let state = self.transport.save();
        let block = new_block(self.read_only);
        let mut manager = Manager::new().expect("epoll");
        manager.add_subscriber(block.clone());
        // Every state the transport reached through its registers must be restorable.
        let args = MmioTransportArgs {
            device: block.clone(),
            mem: self.mem.clone(),
            interrupt: interrupt(),
        };
        let transport = MmioTransport::restore(args, &state)
            .unwrap_or_else(|e| panic!("restoring a reachable state {state:?}: {e}"));
        assert_eq!(transport.save(), state);
        self.transport = transport;
        self.block = block;
        self.manager = manager;
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut rig = Rig::new(input.bool());
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        let op = input.u8();
        let offset = if op & 0x80 != 0 {
            input.u64()
        } else {
            u64::from(input.u16() % 0x1100)
        };
        let size = usize::from(input.u8() % 9);
        match op % 8 {
            0 | 1 | 2 => {
                let value = input.u64().to_le_bytes();
                rig.transport.write(offset, &value[..size]);
            }
            3 | 4 => {
                let mut buf = [0u8; 8];
                rig.transport.read(offset, &mut buf[..size]);
            }
            5 => {
                let len = usize::from(input.u8());
                let bytes = input.take(len);
                let _ = rig.mem.write_slice(bytes, GuestAddress(offset % MEM_END));
            }
            6 => {
                let _ = rig.manager.run_with_timeout(0);
            }
            _ => {
                if op & 0x40 != 0 {
                    rig.snapshot_round_trip();
                } else {
                    rig.init_shortcut(&mut input);
                }
            }
        }
        // The transport's view and the device's agree on whether it runs.
        let driver_ok = rig.transport.status() & 4 != 0;
        let active = rig.block.lock().map(|b| b.is_active()).unwrap_or(false);
        assert!(!active || driver_ok, "device active without DRIVER_OK");
    }
});
