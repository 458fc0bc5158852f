//! A minimal guest-side virtio driver for the vsock tests: lays out split queues in guest
//! memory, posts descriptor chains (either layout) and reads the used rings. (The benchmarks
//! drive the device with `devices_bench_support::vsock` instead.)

#![allow(dead_code)]

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

pub type Mem = GuestMemoryMmap<AtomicBitmap>;

pub const HDR: usize = 44;
pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Per-chain buffer area: header slot + 64 KiB data.
const SLOT_BYTES: u64 = 0x1_1000;

/// How a packet's header and data are laid out in descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Header and data in one descriptor (Linux >= 6.2).
    Single,
    /// Header descriptor, then data descriptor.
    Split,
}

struct Ring {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    size: u16,
    avail_idx: u16,
    used_seen: u16,
    next_chain: u16,
    buffers: GuestAddress,
}

pub struct Driver {
    pub mem: Mem,
    rings: Vec<Ring>,
}

impl Driver {
    /// `n` queues of `size` entries, in a fresh guest memory.
    pub fn new(n: usize, size: u16) -> Self {
        let slots_per_queue = u64::from(size / 2);
        let ring_area = 0x10_0000u64;
        let buf_base = ring_area * (n as u64 + 1);
        let mem_size = buf_base + n as u64 * slots_per_queue * SLOT_BYTES;
        let mem = Mem::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
        let mut rings = Vec::new();
        for q in 0..n as u64 {
            // Spec layout. (`MockSplitQueue::create` places the used ring `size` bytes after
            // the avail ring start instead of `2 * size + 6`, so its rings overlap once more
            // than half the entries are in use.)
            let desc = GuestAddress(ring_area * (q + 1));
            let avail = desc.unchecked_add(16 * u64::from(size));
            let used = GuestAddress((avail.0 + 6 + 2 * u64::from(size) + 3) & !3);
            rings.push(Ring {
                desc,
                avail,
                used,
                size,
                avail_idx: 0,
                used_seen: 0,
                next_chain: 0,
                buffers: GuestAddress(buf_base + q * slots_per_queue * SLOT_BYTES),
            });
        }
        Self { mem, rings }
    }

    /// A device-side `Queue` for queue `q` (what the transport would hand over).
    pub fn queue(&self, q: usize) -> Queue {
        let r = &self.rings[q];
        let mut queue = Queue::new(r.size).unwrap();
        queue.set_size(r.size);
        queue.set_desc_table_address(Some(r.desc.0 as u32), Some((r.desc.0 >> 32) as u32));
        queue.set_avail_ring_address(Some(r.avail.0 as u32), Some((r.avail.0 >> 32) as u32));
        queue.set_used_ring_address(Some(r.used.0 as u32), Some((r.used.0 >> 32) as u32));
        queue.set_ready(true);
        queue
    }

    fn slot_addr(&self, q: usize, slot: u16) -> GuestAddress {
        GuestAddress(self.rings[q].buffers.0 + u64::from(slot) * SLOT_BYTES)
    }

    /// Posts a chain of raw descriptors `(addr, len, flags)`; NEXT flags are set here. Each
    /// chain slot owns two descriptor-table entries; a longer chain takes consecutive slots.
    pub fn push_raw_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let r = &mut self.rings[q];
        let slots = descs.len().div_ceil(2).max(1) as u16;
        let mut slot = r.next_chain % (r.size / 2);
        if slot + slots > r.size / 2 {
            // Do not wrap a chain around the end of the table.
            r.next_chain = r.next_chain.wrapping_add(r.size / 2 - slot);
            slot = 0;
        }
        assert!(slots <= r.size / 2, "chain longer than the table");
        r.next_chain = r.next_chain.wrapping_add(slots);
        let head = slot * 2;
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let idx = head + i as u16;
            let last = i + 1 == descs.len();
            let flags = if last {
                *flags
            } else {
                flags | VRING_DESC_F_NEXT
            };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&(idx + 1).to_le_bytes());
            self.mem
                .write_slice(&raw, r.desc.unchecked_add(u64::from(idx) * 16))
                .unwrap();
        }
        let ring_slot = r.avail_idx % r.size;
        self.mem
            .write_obj(
                head.to_le(),
                r.avail.unchecked_add(4 + u64::from(ring_slot) * 2),
            )
            .unwrap();
        r.avail_idx = r.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(r.avail_idx.to_le(), r.avail.unchecked_add(2))
            .unwrap();
        head
    }

    /// The guest address of the buffer slot the next chain on `q` will use.
    pub fn next_slot_addr(&self, q: usize) -> GuestAddress {
        let r = &self.rings[q];
        self.slot_addr(q, r.next_chain % (r.size / 2))
    }

    /// Queues a TX packet (device-readable).
    pub fn send(&mut self, q: usize, header: &[u8; HDR], data: &[u8], layout: Layout) {
        let base = self.next_slot_addr(q);
        self.mem.write_slice(header, base).unwrap();
        match layout {
            Layout::Single => {
                self.mem
                    .write_slice(data, base.unchecked_add(HDR as u64))
                    .unwrap();
                let len = (HDR + data.len()) as u32;
                self.push_raw_chain(q, &[(base.0, len, 0)]);
            }
            Layout::Split => {
                let data_addr = base.unchecked_add(0x1000);
                self.mem.write_slice(data, data_addr).unwrap();
                if data.is_empty() {
                    self.push_raw_chain(q, &[(base.0, HDR as u32, 0)]);
                } else {
                    self.push_raw_chain(
                        q,
                        &[(base.0, HDR as u32, 0), (data_addr.0, data.len() as u32, 0)],
                    );
                }
            }
        }
    }

    /// Posts one device-writable RX buffer with `data_len` bytes of payload room.
    pub fn post_rx(&mut self, q: usize, data_len: u32, layout: Layout) {
        let base = self.next_slot_addr(q);
        match layout {
            Layout::Single => {
                self.push_raw_chain(q, &[(base.0, HDR as u32 + data_len, VRING_DESC_F_WRITE)]);
            }
            Layout::Split => {
                let data_addr = base.unchecked_add(0x1000);
                self.push_raw_chain(
                    q,
                    &[
                        (base.0, HDR as u32, VRING_DESC_F_WRITE),
                        (data_addr.0, data_len, VRING_DESC_F_WRITE),
                    ],
                );
            }
        }
    }

    /// New used-ring entries of `q` as (head index, written length).
    pub fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let r = &mut self.rings[q];
        let idx: u16 = u16::from_le(self.mem.read_obj(r.used.unchecked_add(2)).unwrap());
        let mut out = Vec::new();
        while r.used_seen != idx {
            let slot = r.used_seen % r.size;
            let elem = r.used.unchecked_add(4 + u64::from(slot) * 8);
            let id: u32 = u32::from_le(self.mem.read_obj(elem).unwrap());
            let len: u32 = u32::from_le(self.mem.read_obj(elem.unchecked_add(4)).unwrap());
            out.push((id as u16, len));
            r.used_seen = r.used_seen.wrapping_add(1);
        }
        out
    }

    /// Completed RX packets as (raw header, payload). Handles both layouts.
    pub fn take_rx(&mut self, q: usize) -> Vec<([u8; HDR], Vec<u8>)> {
        let used = self.take_used(q);
        used.into_iter()
            .filter(|(_, len)| *len as usize >= HDR)
            .map(|(head, len)| {
                let desc = self.rings[q].desc.unchecked_add(u64::from(head) * 16);
                let addr: u64 = u64::from_le(self.mem.read_obj(desc).unwrap());
                let flags: u16 = u16::from_le(self.mem.read_obj(desc.unchecked_add(12)).unwrap());
                let mut hdr = [0u8; HDR];
                self.mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
                let data_len = len as usize - HDR;
                let data_addr = if flags & VRING_DESC_F_NEXT != 0 {
                    let next = desc.unchecked_add(16);
                    GuestAddress(u64::from_le(self.mem.read_obj(next).unwrap()))
                } else {
                    GuestAddress(addr + HDR as u64)
                };
                let mut data = vec![0u8; data_len];
                self.mem.read_slice(&mut data, data_addr).unwrap();
                (hdr, data)
            })
            .collect()
    }
}
