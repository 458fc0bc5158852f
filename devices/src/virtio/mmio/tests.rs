use std::sync::atomic::Ordering;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_memory::GuestAddress;

use super::*;
use crate::interrupt::CountingLine;
use crate::persist::Persist;

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEAT: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const V1: u64 = 1 << VIRTIO_F_VERSION_1;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const OFFERED: u64 = V1 | EVENT_IDX | 0b101;

fn args(
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
) -> MmioTransportArgs {
    MmioTransportArgs {
        device,
        mem,
        interrupt,
    }
}

#[derive(Default)]
struct FakeDevice {
    sizes: Vec<u16>,
    config: Vec<u8>,
    config_writes: Vec<(u64, Vec<u8>)>,
    activations: Vec<(u64, Vec<QueueState>, usize)>,
    resets: usize,
    active: bool,
    fail_activation: bool,
    live: Vec<QueueState>,
}

impl MutEventSubscriber for FakeDevice {
    fn process(&mut self, _: Events, _: &mut EventOps) {}
    fn init(&mut self, _: &mut EventOps) {}
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn device_features(&self) -> u64 {
        OFFERED
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (d, s) in data.iter_mut().zip(self.config.iter().skip(start)) {
            *d = *s;
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes.push((offset, data.to_vec()));
    }
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::Backend("nope".into()));
        }
        if self.active {
            return Err(ActivateError::AlreadyActive);
        }
        let states: Vec<QueueState> = ctx.queues.iter().map(Queue::state).collect();
        self.live = states.clone();
        self.activations
            .push((ctx.acked_features, states, ctx.queue_events.len()));
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.active = false;
    }
    fn is_active(&self) -> bool {
        self.active
    }
    fn queue_states(&self) -> Vec<QueueState> {
        self.live.clone()
    }
}

struct Setup {
    transport: MmioTransport,
    device: Arc<Mutex<FakeDevice>>,
    line: Arc<CountingLine>,
    interrupt: Arc<VirtioInterrupt>,
    mem: GuestMemory,
}

fn setup() -> Setup {
    let device = Arc::new(Mutex::new(FakeDevice {
        sizes: vec![256, 16],
        config: (0u8..16).collect(),
        ..Default::default()
    }));
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let line = Arc::new(CountingLine::default());
    let interrupt = Arc::new(VirtioInterrupt::new(line.clone()));
    let transport = MmioTransport::new(device.clone(), mem.clone(), interrupt.clone()).unwrap();
    Setup {
        transport,
        device,
        line,
        interrupt,
        mem,
    }
}

fn r(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn w(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn ack_features(t: &mut MmioTransport, features: u64) {
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, features as u32);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
}

fn to_features_ok(t: &mut MmioTransport, features: u64) {
    w(t, reg::STATUS, ACK);
    w(t, reg::STATUS, ACK | DRV);
    ack_features(t, features);
    w(t, reg::STATUS, ACK | DRV | FEAT);
}

fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
    w(t, reg::QUEUE_SEL, index);
    assert_eq!(r(t, reg::QUEUE_READY), 0);
    w(t, reg::QUEUE_NUM, size);
    w(t, reg::QUEUE_DESC_LOW, base as u32);
    w(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
    w(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
    w(t, reg::QUEUE_DRIVER_HIGH, 0);
    w(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
    w(t, reg::QUEUE_DEVICE_HIGH, 0);
    w(t, reg::QUEUE_READY, 1);
}

fn to_driver_ok(t: &mut MmioTransport, features: u64) {
    to_features_ok(t, features);
    setup_queue(t, 0, 128, 0x1_0000);
    setup_queue(t, 1, 16, 0x2_0000);
    w(t, reg::STATUS, ACK | DRV | FEAT | DOK);
}

#[test]
fn identification_registers() {
    let Setup { mut transport, .. } = setup();
    let t = &mut transport;
    assert_eq!(r(t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(t, reg::VERSION), 2);
    assert_eq!(r(t, reg::DEVICE_ID), 2);
    assert_eq!(r(t, reg::VENDOR_ID), VENDOR_ID);
    w(t, reg::QUEUE_SEL, 0);
    assert_eq!(r(t, reg::QUEUE_NUM_MAX), 256);
    w(t, reg::QUEUE_SEL, 1);
    assert_eq!(r(t, reg::QUEUE_NUM_MAX), 16);
    w(t, reg::QUEUE_SEL, 2);
    assert_eq!(r(t, reg::QUEUE_NUM_MAX), 0, "absent queue");
    assert_eq!(r(t, reg::QUEUE_READY), 0);
    assert_eq!(t.queue_events().len(), 2);
}

#[test]
fn device_features_are_read_in_32_bit_halves() {
    let Setup { mut transport, .. } = setup();
    let t = &mut transport;
    w(t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(r(t, reg::DEVICE_FEATURES), OFFERED as u32);
    w(t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(t, reg::DEVICE_FEATURES), (OFFERED >> 32) as u32);
    w(t, reg::DEVICE_FEATURES_SEL, 7);
    assert_eq!(r(t, reg::DEVICE_FEATURES), 0);
}

#[test]
fn features_ok_accepted_for_an_offered_subset() {
    let Setup { mut transport, .. } = setup();
    to_features_ok(&mut transport, V1 | 0b1);
    assert_eq!(r(&mut transport, reg::STATUS), ACK | DRV | FEAT);
    assert_eq!(transport.acked_features(), V1 | 1);
}

#[test]
fn features_ok_refused_for_unoffered_bits_or_legacy_driver() {
    for features in [V1 | 0b10, V1 | (1 << 40), 0b1] {
        let Setup { mut transport, .. } = setup();
        to_features_ok(&mut transport, features);
        assert_eq!(
            r(&mut transport, reg::STATUS),
            ACK | DRV,
            "features {features:#x} must not be accepted"
        );
        // Nor can the driver go on to DRIVER_OK.
        w(&mut transport, reg::STATUS, ACK | DRV | FEAT | DOK);
        assert_eq!(r(&mut transport, reg::STATUS), ACK | DRV);
    }
}

#[test]
fn features_cannot_change_outside_the_negotiation_phase() {
    let Setup { mut transport, .. } = setup();
    ack_features(&mut transport, V1);
    assert_eq!(transport.acked_features(), 0, "before DRIVER");
    to_features_ok(&mut transport, V1);
    ack_features(&mut transport, V1 | 1);
    assert_eq!(transport.acked_features(), V1, "after FEATURES_OK");
}

#[test]
fn status_steps_must_come_in_order_and_never_be_cleared() {
    let Setup { mut transport, .. } = setup();
    let t = &mut transport;
    w(t, reg::STATUS, DRV);
    assert_eq!(r(t, reg::STATUS), 0, "DRIVER before ACKNOWLEDGE");
    w(t, reg::STATUS, ACK);
    w(t, reg::STATUS, ACK | FEAT);
    assert_eq!(r(t, reg::STATUS), ACK, "skipping DRIVER");
    w(t, reg::STATUS, ACK | DRV);
    w(t, reg::STATUS, DRV);
    assert_eq!(r(t, reg::STATUS), ACK | DRV, "clearing ACKNOWLEDGE");
    w(t, reg::STATUS, 0x1000);
    assert_eq!(r(t, reg::STATUS), ACK | DRV, "unknown bit");
    w(t, reg::STATUS, ACK | DRV | VIRTIO_CONFIG_S_FAILED);
    assert_eq!(r(t, reg::STATUS), ACK | DRV | VIRTIO_CONFIG_S_FAILED);
}

#[test]
fn driver_ok_activates_the_device_with_the_configured_queues() {
    let Setup {
        mut transport,
        device,
        ..
    } = setup();
    to_driver_ok(&mut transport, V1 | EVENT_IDX);
    assert_eq!(r(&mut transport, reg::STATUS), ACK | DRV | FEAT | DOK);
    let dev = device.lock().unwrap();
    assert_eq!(dev.activations.len(), 1);
    let (acked, queues, events) = &dev.activations[0];
    assert_eq!(*acked, V1 | EVENT_IDX);
    assert_eq!(*events, 2);
    assert_eq!(queues[0].size, 128);
    assert_eq!(queues[0].desc_table, 0x1_0000);
    assert_eq!(queues[0].avail_ring, 0x1_1000);
    assert_eq!(queues[0].used_ring, 0x1_2000);
    assert!(queues[0].ready && queues[0].event_idx_enabled);
    assert_eq!(queues[1].size, 16);
    assert_eq!(queues[1].desc_table, 0x2_0000);
}

#[test]
fn event_idx_stays_off_unless_acked() {
    let Setup {
        mut transport,
        device,
        ..
    } = setup();
    to_driver_ok(&mut transport, V1);
    let dev = device.lock().unwrap();
    assert!(!dev.activations[0].1[0].event_idx_enabled);
}

#[test]
fn driver_ok_with_an_unusable_queue_sets_needs_reset() {
    let Setup {
        mut transport,
        device,
        line,
        interrupt,
        ..
    } = setup();
    to_features_ok(&mut transport, V1);
    setup_queue(&mut transport, 0, 128, 0x1_0000);
    // Queue 1 lies outside guest memory.
    setup_queue(&mut transport, 1, 16, 0x10_0000);
    w(&mut transport, reg::STATUS, ACK | DRV | FEAT | DOK);
    let status = r(&mut transport, reg::STATUS);
    assert_eq!(status & DOK, 0);
    assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(device.lock().unwrap().activations.is_empty());
    assert_eq!(line.0.load(Ordering::SeqCst), 1);
    assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG_BIT);
}

const VIRTIO_MMIO_INT_CONFIG_BIT: u32 = crate::virtio::VIRTIO_MMIO_INT_CONFIG;

#[test]
fn failed_activation_sets_needs_reset_until_reset() {
    let Setup {
        mut transport,
        device,
        ..
    } = setup();
    device.lock().unwrap().fail_activation = true;
    to_driver_ok(&mut transport, V1);
    assert_eq!(
        r(&mut transport, reg::STATUS),
        ACK | DRV | FEAT | VIRTIO_CONFIG_S_NEEDS_RESET
    );
    w(&mut transport, reg::STATUS, 0);
    assert_eq!(r(&mut transport, reg::STATUS), 0);
    device.lock().unwrap().fail_activation = false;
    to_driver_ok(&mut transport, V1);
    assert_eq!(r(&mut transport, reg::STATUS), ACK | DRV | FEAT | DOK);
}

#[test]
fn queues_are_configurable_only_between_features_ok_and_driver_ok() {
    let Setup { mut transport, .. } = setup();
    let t = &mut transport;
    w(t, reg::QUEUE_SEL, 0);
    w(t, reg::QUEUE_NUM, 64);
    w(t, reg::QUEUE_READY, 1);
    assert_eq!(r(t, reg::QUEUE_READY), 0, "before FEATURES_OK");
    to_driver_ok(t, V1);
    w(t, reg::QUEUE_SEL, 0);
    w(t, reg::QUEUE_READY, 0);
    assert_eq!(r(t, reg::QUEUE_READY), 1, "after DRIVER_OK");
    assert_eq!(t.queues[0].size(), 128);
}

#[test]
fn invalid_queue_sizes_and_moves_of_ready_queues_are_ignored() {
    let Setup { mut transport, .. } = setup();
    let t = &mut transport;
    to_features_ok(t, V1);
    w(t, reg::QUEUE_SEL, 0);
    for bad in [0, 3, 512, 0x1_0080] {
        w(t, reg::QUEUE_NUM, bad);
        assert_eq!(t.queues[0].size(), 256, "size {bad:#x}");
    }
    setup_queue(t, 0, 64, 0x1_0000);
    w(t, reg::QUEUE_SEL, 0);
    w(t, reg::QUEUE_DESC_LOW, 0x5_0000);
    assert_eq!(t.queues[0].desc_table(), 0x1_0000);
    // Misaligned rings are refused by virtio-queue.
    w(t, reg::QUEUE_SEL, 1);
    w(t, reg::QUEUE_DESC_LOW, 0x2_0001);
    assert_eq!(t.queues[1].desc_table(), 0);
}

#[test]
fn reset_returns_everything_to_initial_state() {
    let Setup {
        mut transport,
        device,
        interrupt,
        ..
    } = setup();
    to_driver_ok(&mut transport, V1 | EVENT_IDX);
    interrupt.signal_used_queue().unwrap();
    w(&mut transport, reg::STATUS, 0);
    assert_eq!(device.lock().unwrap().resets, 1);
    assert!(!device.lock().unwrap().active);
    assert_eq!(r(&mut transport, reg::STATUS), 0);
    assert_eq!(r(&mut transport, reg::INTERRUPT_STATUS), 0);
    assert_eq!(transport.acked_features(), 0);
    for q in &transport.queues {
        assert!(!q.ready());
        assert_eq!(q.size(), q.max_size());
        assert_eq!(q.desc_table(), 0);
    }
    // A second initialisation works and activates again.
    to_driver_ok(&mut transport, V1);
    assert_eq!(device.lock().unwrap().activations.len(), 2);
    // Resetting an inactive device does not call its reset.
    w(&mut transport, reg::STATUS, 0);
    w(&mut transport, reg::STATUS, 0);
    assert_eq!(device.lock().unwrap().resets, 2);
}

#[test]
fn queue_notify_writes_the_queue_eventfd() {
    let Setup { mut transport, .. } = setup();
    w(&mut transport, reg::QUEUE_NOTIFY, 1);
    assert_eq!(transport.queue_events()[1].read().unwrap(), 1);
    assert!(
        transport.queue_events()[0].read().is_err(),
        "queue 0 untouched"
    );
    w(&mut transport, reg::QUEUE_NOTIFY, 99);
    w(&mut transport, reg::QUEUE_NOTIFY, u32::MAX);
    assert!(transport.queue_events()[0].read().is_err());
    assert!(transport.queue_events()[1].read().is_err());
}

#[test]
fn interrupt_status_and_ack() {
    let Setup {
        mut transport,
        interrupt,
        ..
    } = setup();
    interrupt.signal_used_queue().unwrap();
    interrupt.signal_config_change().unwrap();
    assert_eq!(r(&mut transport, reg::INTERRUPT_STATUS), 3);
    w(&mut transport, reg::INTERRUPT_ACK, 1);
    assert_eq!(r(&mut transport, reg::INTERRUPT_STATUS), 2);
}

#[test]
fn config_space_is_forwarded_to_the_device() {
    let Setup {
        mut transport,
        device,
        ..
    } = setup();
    let mut buf = [0u8; 2];
    transport.read(reg::CONFIG_SPACE + 3, &mut buf);
    assert_eq!(buf, [3, 4]);
    let mut byte = [0xffu8; 1];
    transport.read(reg::CONFIG_SPACE + 100, &mut byte);
    assert_eq!(byte, [0]);
    transport.write(reg::CONFIG_SPACE + 5, &[9, 9, 9]);
    assert_eq!(
        device.lock().unwrap().config_writes,
        vec![(5, vec![9, 9, 9])]
    );
}

#[test]
fn bad_sizes_and_offsets_are_harmless() {
    let Setup { mut transport, .. } = setup();
    let t = &mut transport;
    for len in [0usize, 1, 2, 3, 8] {
        let mut buf = vec![0xaau8; len];
        t.read(reg::MAGIC_VALUE, &mut buf);
        assert!(buf.iter().all(|&b| b == 0), "{len}-byte read");
        t.write(reg::STATUS, &vec![1u8; len]);
    }
    assert_eq!(r(t, reg::STATUS), 0, "wrong-size status writes ignored");
    for offset in [
        0x18, 0x28, 0x3c, 0x40, 0x48, 0x4c, 0x54, 0xac, 0xc0, 0xf8, 0x1, 0x3, 0xff,
    ] {
        assert_eq!(r(t, offset), 0, "offset {offset:#x}");
        w(t, offset, u32::MAX);
    }
    // Shared memory regions do not exist: length reads as -1.
    assert_eq!(r(t, 0xb0), u32::MAX);
    // Offsets far past the window still go to config space, which reads zero.
    assert_eq!(r(t, u64::MAX - 3), 0);
    w(t, u64::MAX - 3, 1);
    assert_eq!(r(t, reg::STATUS), 0);
}

#[test]
fn cmdline_entry_format() {
    assert_eq!(
        kernel_cmdline_entry(0xd000_0000, 5),
        "virtio_mmio.device=4K@0xd0000000:5"
    );
}

#[test]
fn save_and_restore_round_trip_reactivates_the_device() {
    let Setup {
        mut transport,
        device,
        mem,
        interrupt,
        ..
    } = setup();
    to_driver_ok(&mut transport, V1 | EVENT_IDX);
    // The device has made progress on queue 0.
    device.lock().unwrap().live[0].next_avail = 7;
    device.lock().unwrap().live[0].next_used = 5;
    interrupt.signal_used_queue().unwrap();
    w(&mut transport, reg::QUEUE_SEL, 1);
    let state = transport.save();
    assert_eq!(state.queues[0].next_avail, 7);
    assert_eq!(state.interrupt_status, 1);
    let json = serde_json::to_string(&state).unwrap();
    let state: MmioTransportState = serde_json::from_str(&json).unwrap();

    let fresh = Arc::new(Mutex::new(FakeDevice {
        sizes: vec![256, 16],
        ..Default::default()
    }));
    let new_interrupt = Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::default())));
    let mut restored =
        MmioTransport::restore(args(fresh.clone(), mem, new_interrupt.clone()), &state).unwrap();
    assert_eq!(r(&mut restored, reg::STATUS), ACK | DRV | FEAT | DOK);
    assert_eq!(
        r(&mut restored, reg::QUEUE_NUM_MAX),
        16,
        "queue_sel restored"
    );
    assert_eq!(new_interrupt.status(), 1);
    let dev = fresh.lock().unwrap();
    assert_eq!(dev.activations.len(), 1);
    let (acked, queues, _) = &dev.activations[0];
    assert_eq!(*acked, V1 | EVENT_IDX);
    assert_eq!(queues[0].next_avail, 7);
    assert_eq!(queues[0].next_used, 5);
    assert!(queues[0].event_idx_enabled);
    drop(dev);
    assert_eq!(restored.save(), state);
}

#[test]
fn save_before_driver_ok_restores_without_activation() {
    let Setup {
        mut transport, mem, ..
    } = setup();
    to_features_ok(&mut transport, V1);
    setup_queue(&mut transport, 0, 64, 0x1_0000);
    let state = transport.save();
    let fresh = Arc::new(Mutex::new(FakeDevice {
        sizes: vec![256, 16],
        ..Default::default()
    }));
    let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::default())));
    let mut restored = MmioTransport::restore(args(fresh.clone(), mem, interrupt), &state).unwrap();
    assert!(fresh.lock().unwrap().activations.is_empty());
    // The driver can finish initialisation on the restored transport.
    setup_queue(&mut restored, 1, 16, 0x2_0000);
    w(&mut restored, reg::STATUS, ACK | DRV | FEAT | DOK);
    assert_eq!(fresh.lock().unwrap().activations.len(), 1);
    assert_eq!(fresh.lock().unwrap().activations[0].1[0].size, 64);
}

/// Found by the mmio_transport fuzz target: a driver that wrote unoffered feature bits and has
/// not (successfully) set FEATURES_OK yet must not make the VM's snapshot unrestorable.
#[test]
fn unvalidated_feature_writes_before_features_ok_restore() {
    let Setup {
        mut transport, mem, ..
    } = setup();
    w(&mut transport, reg::STATUS, ACK);
    w(&mut transport, reg::STATUS, ACK | DRV);
    ack_features(&mut transport, u64::MAX);
    // Refused: the status stays ACK | DRIVER with the bogus features recorded.
    w(&mut transport, reg::STATUS, ACK | DRV | FEAT);
    let state = transport.save();
    assert_eq!(state.status, ACK | DRV);
    assert_eq!(state.acked_features, u64::MAX);
    let fresh = Arc::new(Mutex::new(FakeDevice {
        sizes: vec![256, 16],
        ..Default::default()
    }));
    let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::default())));
    let mut restored = MmioTransport::restore(args(fresh, mem, interrupt), &state).unwrap();
    assert_eq!(restored.save(), state);
    // And FEATURES_OK is still refused for them after the restore.
    w(&mut restored, reg::STATUS, ACK | DRV | FEAT);
    assert_eq!(r(&mut restored, reg::STATUS), ACK | DRV);
}

#[test]
fn restore_rejects_inconsistent_state_without_side_effects() {
    let Setup {
        mut transport, mem, ..
    } = setup();
    to_driver_ok(&mut transport, V1);
    let good = transport.save();
    let mut cases: Vec<(&str, MmioTransportState)> = Vec::new();
    let mut s = good.clone();
    s.queues.pop();
    cases.push(("queue count", s));
    let mut s = good.clone();
    s.queues[0].max_size = 128;
    cases.push(("max size", s));
    let mut s = good.clone();
    s.queues[0].size = 100;
    cases.push(("queue size", s));
    let mut s = good.clone();
    s.queues[1].desc_table = 0x2_0003;
    cases.push(("misaligned ring", s));
    let mut s = good.clone();
    s.queues[1].used_ring = 0x10_0000;
    cases.push(("ring outside memory", s));
    let mut s = good.clone();
    s.status = ACK | FEAT;
    cases.push(("status", s));
    let mut s = good.clone();
    s.status |= 0x100;
    cases.push(("status bits", s));
    let mut s = good.clone();
    s.acked_features |= 1 << 50;
    cases.push(("features", s));
    for (name, state) in cases {
        let fresh = Arc::new(Mutex::new(FakeDevice {
            sizes: vec![256, 16],
            ..Default::default()
        }));
        let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::default())));
        interrupt.set_status(0);
        let result =
            MmioTransport::restore(args(fresh.clone(), mem.clone(), interrupt.clone()), &state);
        assert!(result.is_err(), "{name}");
        assert!(fresh.lock().unwrap().activations.is_empty(), "{name}");
        assert_eq!(interrupt.status(), 0, "{name}");
    }
}

#[test]
fn save_falls_back_to_the_used_ring_for_devices_without_queue_states() {
    let Setup {
        mut transport,
        device,
        mem,
        ..
    } = setup();
    to_driver_ok(&mut transport, V1);
    device.lock().unwrap().live.clear();
    // Used ring of queue 0 is at 0x1_2000; its idx at +2.
    vm_memory::Bytes::write_obj(&mem, 9u16, GuestAddress(0x1_2002)).unwrap();
    let state = transport.save();
    assert_eq!(state.queues[0].next_used, 9);
    assert_eq!(state.queues[0].next_avail, 9);
}

#[test]
fn invalid_queue_sizes_set_needs_reset_and_refuse_driver_ok() {
    for bad in [0u32, 3, 512, 0x1_0080] {
        let Setup {
            mut transport,
            device,
            line,
            ..
        } = setup();
        let t = &mut transport;
        to_features_ok(t, V1);
        setup_queue(t, 1, 16, 0x2_0000);
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_NUM, bad);
        assert_eq!(t.queues[0].size(), 256, "size {bad:#x} kept out");
        assert_eq!(
            r(t, reg::STATUS),
            ACK | DRV | FEAT | VIRTIO_CONFIG_S_NEEDS_RESET,
            "size {bad:#x}"
        );
        // Before DRIVER_OK no notification is owed.
        assert_eq!(line.0.load(Ordering::SeqCst), 0);
        setup_queue(t, 0, 64, 0x1_0000);
        w(t, reg::STATUS, ACK | DRV | FEAT | DOK);
        assert_eq!(r(t, reg::STATUS) & DOK, 0, "DRIVER_OK refused");
        assert!(device.lock().unwrap().activations.is_empty());
        w(t, reg::STATUS, 0);
        assert_eq!(r(t, reg::STATUS), 0);
        to_driver_ok(t, V1);
        assert_eq!(r(t, reg::STATUS), ACK | DRV | FEAT | DOK);
    }
}

#[test]
fn a_device_that_finds_its_rings_broken_shows_needs_reset_until_reset() {
    let Setup {
        mut transport,
        interrupt,
        line,
        ..
    } = setup();
    to_driver_ok(&mut transport, V1);
    let before = line.0.load(Ordering::SeqCst);
    // What a device does on a malformed queue (see queue_check).
    interrupt.queue_fault("test", 0, &virtio_queue::Error::InvalidChain);
    let needs = ACK | DRV | FEAT | DOK | VIRTIO_CONFIG_S_NEEDS_RESET;
    assert_eq!(r(&mut transport, reg::STATUS), needs);
    assert_eq!(transport.save().status, needs);
    assert_eq!(
        r(&mut transport, reg::INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG_BIT,
        VIRTIO_MMIO_INT_CONFIG_BIT
    );
    assert_eq!(line.0.load(Ordering::SeqCst), before + 1);
    // Reported once: a second fault neither logs nor interrupts again.
    interrupt.queue_fault("test", 0, &virtio_queue::Error::InvalidChain);
    assert_eq!(line.0.load(Ordering::SeqCst), before + 1);
    w(&mut transport, reg::STATUS, 0);
    assert_eq!(r(&mut transport, reg::STATUS), 0);
    assert!(!interrupt.needs_reset());
    to_driver_ok(&mut transport, V1);
    assert_eq!(r(&mut transport, reg::STATUS), ACK | DRV | FEAT | DOK);
}
