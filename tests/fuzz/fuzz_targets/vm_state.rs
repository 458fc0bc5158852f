//! The real saved-state decoder: `snapshot::decode_state::<VmSnapshotState>`, exactly what
//! restore calls on `state.bin`. Nothing here knows the encoding (it is allowed to change):
//!
//! - libFuzzer's byte mutations of the committed seeds (real `state.bin` images) exercise the
//!   format's own checks (header, version, lengths, checksums);
//! - a custom mutator decodes an input that is a valid image, changes the decoded
//!   `VmSnapshotState` (counts, lengths, extreme values, devices added and removed) and
//!   re-encodes it with `snapshot::encode_state`, so the decoder also sees well-sealed images
//!   of states no VM would write. Byte mutations cannot get there on their own: any change
//!   behind the checksum is rejected before the payload is decoded.
//!
//! Property: whatever decodes re-encodes, and decoding that gives the same encoding again.

#![no_main]

use libfuzzer_sys::{fuzz_mutator, fuzz_target, fuzzer_mutate};
use snapshot::{decode_state, encode_state};
use vmm::device_manager::SavedDevice;
use vmm::hypervisor::state::MsrEntry;
use vmm::vm::VmSnapshotState;

fuzz_target!(|data: &[u8]| {
    let Ok(state) = decode_state::<VmSnapshotState>(data) else {
        return;
    };
    let image = encode_state(&state).expect("a decoded state encodes");
    let again = decode_state::<VmSnapshotState>(&image).expect("a re-encoded state decodes");
    assert_eq!(
        encode_state(&again).expect("encodes"),
        image,
        "decode/encode is not stable"
    );
});

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: any seed but 0.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// A value biased towards boundaries.
    fn value(&mut self) -> u64 {
        match self.below(6) {
            0 => 0,
            1 => u64::MAX,
            2 => 1 << self.below(64),
            3 => u64::from(u32::MAX) + self.below(3) - 1,
            _ => self.next(),
        }
    }
}

/// One typed change to a decoded state.
fn mutate_state(state: &mut VmSnapshotState, rng: &mut Rng) {
    match rng.below(14) {
        0 => state.vcpu_count = rng.value() as u8,
        1 => state.mem_mib = rng.value(),
        2 => {
            let len = rng.below(300) as usize;
            state.cmdline = (0..len).map(|_| char::from(rng.below(128) as u8)).collect();
        }
        3 => {
            if !state.vcpus.is_empty() && rng.below(2) == 0 {
                let at = rng.below(state.vcpus.len() as u64) as usize;
                state.vcpus.remove(at);
            } else if let Some(v) = state.vcpus.first().cloned() {
                if state.vcpus.len() < 300 {
                    state.vcpus.push(v);
                }
            }
        }
        4 => {
            if let Some(v) = pick(&mut state.vcpus, rng) {
                v.xsave = match rng.below(3) {
                    0 => None,
                    1 => Some(Vec::new()),
                    _ => Some(vec![rng.value() as u32; rng.below(5000) as usize]),
                };
            }
        }
        5 => {
            if let Some(v) = pick(&mut state.vcpus, rng) {
                let n = rng.below(200) as usize;
                v.msrs = (0..n)
                    .map(|_| MsrEntry {
                        index: rng.value() as u32,
                        value: rng.value(),
                    })
                    .collect();
            }
        }
        6 => {
            if let Some(v) = pick(&mut state.vcpus, rng) {
                let n = rng.below(300) as usize;
                v.cpuid.resize(n, Default::default());
                if let Some(e) = v.cpuid.last_mut() {
                    e.function = rng.value() as u32;
                    e.eax = rng.value() as u32;
                }
            }
        }
        7 => {
            if let Some(v) = pick(&mut state.vcpus, rng) {
                v.regs.rip = rng.value();
                v.regs.rflags = rng.value();
                v.sregs.cr0 = rng.value();
                v.sregs.efer = rng.value();
                v.tsc_khz = (rng.below(2) == 0).then(|| rng.value() as u32);
                let at = rng.below(v.lapic.regs.len() as u64) as usize;
                v.lapic.regs[at] = rng.value() as _;
                v.mp_state.mp_state = rng.value() as u32;
            }
        }
        8 => {
            let len = rng.below(70_000) as usize;
            state.devices.serial.in_buffer = vec![rng.value() as u8; len];
            state.devices.serial.line_status = rng.value() as u8;
            state.devices.serial.interrupt_identification = rng.value() as u8;
        }
        9 => {
            if !state.devices.virtio.is_empty() && rng.below(2) == 0 {
                let at = rng.below(state.devices.virtio.len() as u64) as usize;
                state.devices.virtio.remove(at);
            } else if let Some(d) = state.devices.virtio.first().cloned() {
                if state.devices.virtio.len() < 100 {
                    state.devices.virtio.push(d);
                }
            }
        }
        10 => {
            if let Some(d) = pick(&mut state.devices.virtio, rng) {
                d.irq = rng.value() as u32;
                d.mmio_base = rng.value();
                d.transport.status = rng.value() as u32;
                d.transport.queue_sel = rng.value() as u32;
                d.transport.acked_features = rng.value();
            }
        }
        11 => {
            if let Some(d) = pick(&mut state.devices.virtio, rng) {
                let n = rng.below(20) as usize;
                let q = d.transport.queues.first().copied().unwrap_or_default();
                d.transport.queues.resize(n, q);
                if let Some(q) = d.transport.queues.last_mut() {
                    q.size = rng.value() as u16;
                    q.max_size = rng.value() as u16;
                    q.ready = rng.below(2) == 0;
                    q.desc_table = rng.value();
                    q.next_avail = rng.value() as u16;
                }
            }
        }
        12 => {
            if let Some(d) = pick(&mut state.devices.virtio, rng) {
                match &mut d.device {
                    SavedDevice::Vsock(v) => {
                        v.config.guest_cid = rng.value();
                        v.next_local_port = (rng.below(2) == 0).then(|| rng.value() as u32);
                        v.acked_features = rng.value();
                    }
                    SavedDevice::Block(b) => {
                        b.read_only = !b.read_only;
                        b.id = (rng.below(2) == 0).then(|| "x".repeat(rng.below(64) as usize));
                    }
                    SavedDevice::Net(n) => {
                        n.mac = (rng.value() as u64).to_le_bytes()[..6]
                            .try_into()
                            .unwrap_or_default()
                    }
                    SavedDevice::Balloon(b) => {
                        b.actual_pages = rng.value() as u32;
                        b.stats_head = (rng.below(2) == 0).then(|| rng.value() as u16);
                    }
                }
            }
        }
        _ => {
            state.vm.clock.clock = rng.value();
            state.vm.clock.flags = rng.value() as u32;
            state.vm.clock_taken_at_unix_ns = rng.value();
            if rng.below(2) == 0 {
                state.vm.pit = match state.vm.pit {
                    Some(_) => None,
                    None => Some(Default::default()),
                };
            }
        }
    }
}

fn pick<'a, T>(items: &'a mut [T], rng: &mut Rng) -> Option<&'a mut T> {
    let len = items.len() as u64;
    items.get_mut(rng.below(len) as usize)
}

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let mut rng = Rng(u64::from(seed) | 1 << 40);
    // Half the time (and for anything that does not decode) plain byte mutations.
    if rng.below(2) == 0 {
        if let Ok(mut state) = decode_state::<VmSnapshotState>(&data[..size]) {
            for _ in 0..=rng.below(3) {
                mutate_state(&mut state, &mut rng);
            }
            if let Ok(image) = encode_state(&state) {
                if image.len() <= max_size {
                    data[..image.len()].copy_from_slice(&image);
                    return image.len();
                }
            }
        }
    }
    fuzzer_mutate(data, size, max_size)
});
