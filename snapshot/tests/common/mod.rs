//! Shared helpers for the snapshot integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use snapshot::{GuestMemory, HostInfo, MemoryRegion, PageBitmap, SnapshotMeta, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Shaped like a VMM state: nested structs, byte blobs, maps, options and enums.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestState {
    pub vcpus: Vec<TestVcpu>,
    pub devices: BTreeMap<String, TestDevice>,
    pub irqchip: Vec<u8>,
    pub note: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestVcpu {
    pub id: u32,
    pub regs: [u64; 18],
    pub msrs: Vec<(u32, u64)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TestDevice {
    Serial {
        lsr: u8,
        fifo: Vec<u8>,
    },
    Virtio {
        features: u64,
        queues: Vec<(u16, u64, u64, u64)>,
    },
    Absent,
}

impl snapshot::SavedState for TestState {
    fn from_postcard(_version: u32, payload: &[u8]) -> Result<Self, String> {
        snapshot::decode_postcard(payload)
    }
}

pub fn sample_state() -> TestState {
    let vcpus = (0..2)
        .map(|id| TestVcpu {
            id,
            regs: std::array::from_fn(|i| (i as u64 + 1) * 0x1111 * (u64::from(id) + 1)),
            msrs: vec![(0x10, 12345), (0xc000_0080, 0xd01)],
        })
        .collect();
    let mut devices = BTreeMap::new();
    devices.insert(
        "serial0".to_string(),
        TestDevice::Serial {
            lsr: 0x60,
            fifo: b"hi".to_vec(),
        },
    );
    devices.insert(
        "vsock".to_string(),
        TestDevice::Virtio {
            features: 1 << 32,
            queues: vec![(256, 0x1000, 0x2000, 0x3000)],
        },
    );
    devices.insert("blk".to_string(), TestDevice::Absent);
    TestState {
        vcpus,
        devices,
        irqchip: (0..=255).collect(),
        note: Some("sandbox".into()),
    }
}

pub fn meta() -> SnapshotMeta {
    SnapshotMeta {
        vcpus: 2,
        kernel_id: "vmlinux-6.1@sha256:abcd".into(),
        rootfs_id: "rootfs.ext4@sha256:ef01".into(),
        host: HostInfo {
            kind: "kvm-pvm".into(),
            paging_levels: 4,
            cpu_features: vec!["sse4.2".into(), "avx2".into()],
        },
    }
}

/// Two regions with a gap, like a guest with RAM below and above a PCI hole.
pub fn guest_memory(low: usize, high: usize) -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), low), (GuestAddress(0x1_0000_0000), high)])
        .unwrap()
}

/// A byte pattern that differs per page and per `generation`.
pub fn page_pattern(page: u64, generation: u8) -> Vec<u8> {
    let mut bytes = vec![0u8; PAGE_SIZE as usize];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (page as u8) ^ (i as u8).wrapping_mul(31) ^ generation.wrapping_mul(97) | 1;
    }
    bytes
}

/// Writes `page_pattern` into page `page` of region starting at `base` and marks it dirty.
pub fn touch_page(
    memory: &GuestMemoryMmap<()>,
    dirty: &mut [PageBitmap],
    region: usize,
    base: u64,
    page: u64,
    generation: u8,
) {
    memory
        .write_slice(
            &page_pattern(page, generation),
            GuestAddress(base + page * PAGE_SIZE),
        )
        .unwrap();
    dirty[region].set(page);
}

pub fn zero_page(
    memory: &GuestMemoryMmap<()>,
    dirty: &mut [PageBitmap],
    region: usize,
    base: u64,
    page: u64,
) {
    memory
        .write_slice(
            &vec![0u8; PAGE_SIZE as usize],
            GuestAddress(base + page * PAGE_SIZE),
        )
        .unwrap();
    dirty[region].set(page);
}

pub fn empty_dirty(regions: &[MemoryRegion]) -> Vec<PageBitmap> {
    regions
        .iter()
        .map(|r| PageBitmap::new(r.page_count()))
        .collect()
}

/// The contents of every region, concatenated.
pub fn dump<M: Bytes<GuestAddress>>(memory: &M, regions: &[MemoryRegion]) -> Vec<u8>
where
    M::E: std::fmt::Debug,
{
    let mut out = Vec::new();
    for region in regions {
        let mut buf = vec![0u8; region.size as usize];
        memory
            .read_slice(&mut buf, GuestAddress(region.guest_addr))
            .unwrap();
        out.extend_from_slice(&buf);
    }
    out
}

pub fn dump_restored(memory: &GuestMemory, regions: &[MemoryRegion]) -> Vec<u8> {
    dump(memory, regions)
}

/// Blocks actually allocated to a file, in bytes.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}
