//! Shared pieces of the devices fuzz targets: reading structured values out of the fuzz input,
//! guest memory and split queues built from it, and in-memory disk files.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

use devices::virtio::block::{disk_from_file, Disk};
use devices::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Reads values off the front of the fuzz input; zeroes once it is exhausted, so every input
/// is a valid program.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let src = self.take(N);
        out[..src.len()].copy_from_slice(src);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }
}

/// Guest memory: two adjacent regions (so buffers can straddle a region boundary), then a hole,
/// then a small third region. Addresses in the hole and past the end are invalid.
pub const MEM_REGIONS: [(u64, usize); 3] =
    [(0, 0x1_0000), (0x1_0000, 0x1_0000), (0x3_0000, 0x1000)];
/// One past the highest guest address.
pub const MEM_END: u64 = 0x3_1000;
/// Where fuzz-provided payload bytes are copied.
pub const DATA_BASE: u64 = 0x8000;

pub fn guest_memory() -> GuestMemory {
    let ranges: Vec<(GuestAddress, usize)> = MEM_REGIONS
        .iter()
        .map(|&(base, len)| (GuestAddress(base), len))
        .collect();
    GuestMemory::from_ranges(&ranges).expect("fixed, valid guest memory layout")
}

/// Per-queue ring addresses: queue `i` uses three pages from `0x1000 * (1 + 3 * i)`.
pub fn ring_base(queue_index: u64) -> u64 {
    0x1000 * (1 + 3 * queue_index)
}

/// How descriptors from the input are written to memory.
#[derive(Clone, Copy)]
pub struct Folding {
    /// Reduce addresses and lengths into guest memory, and `next` into the queue, so most
    /// chains are structurally valid and reach the device's own checks.
    pub enabled: bool,
}

/// A split queue configured from the input: size, ring positions, descriptor table and
/// available ring contents. The used ring starts zeroed.
pub fn fuzzed_queue(input: &mut Input, mem: &GuestMemory, index: u64) -> Queue {
    let size_exp = input.u8();
    let size: u16 = 1 << (size_exp % 8); // 1..=128
    let flags = input.u8();
    let folding = Folding {
        enabled: flags & 1 != 0,
    };
    let base = ring_base(index);
    let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);

    for i in 0..u64::from(size) {
        let mut addr = input.u64();
        let mut len = input.u32();
        let desc_flags = input.u16();
        let mut next = input.u16();
        if folding.enabled {
            addr %= MEM_END;
            len %= 0x2_0000;
            next %= size;
        }
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&desc_flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&raw, GuestAddress(desc + 16 * i));
    }
    // Available ring: flags, idx, then `size` entries, then used_event.
    let avail_flags = input.u16();
    let avail_idx = input.u16();
    let _ = mem.write_obj(avail_flags, GuestAddress(avail));
    let _ = mem.write_obj(avail_idx, GuestAddress(avail + 2));
    for i in 0..u64::from(size) + 1 {
        let mut head = input.u16();
        if folding.enabled {
            head %= size;
        }
        let _ = mem.write_obj(head, GuestAddress(avail + 4 + 2 * i));
    }
    let _ = mem.write_slice(&vec![0u8; 0x1000], GuestAddress(used));

    let mut q = Queue::new(size).expect("power-of-two queue size");
    q.set_desc_table_address(Some(desc as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_event_idx(flags & 2 != 0);
    if flags & 4 != 0 {
        // Resume mid-ring, as after a snapshot restore.
        let next_avail = input.u16();
        let next_used = input.u16();
        q.set_next_avail(next_avail);
        q.set_next_used(next_used);
    }
    q.set_ready(true);
    q
}

/// Copies payload bytes to `DATA_BASE` (within the first two regions).
pub fn fill_data(mem: &GuestMemory, data: &[u8]) {
    let room = (0x2_0000 - DATA_BASE) as usize;
    let data = &data[..data.len().min(room)];
    let _ = mem.write_slice(data, GuestAddress(DATA_BASE));
}

/// An in-memory file of `len` bytes of a recognisable pattern (memfd: no disk, no cleanup).
pub fn memfd(len: u64) -> File {
    // SAFETY: the name is a valid NUL-terminated string; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh fd that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    file.write_all(&pattern).expect("filling memfd");
    file
}

/// A disk over a memfd of `len` bytes.
pub fn memfd_disk(len: u64, read_only: bool) -> Disk {
    disk_from_file(memfd(len), read_only, "fuzz").expect("memfd metadata")
}
