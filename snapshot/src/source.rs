//! The guest memory a snapshot is taken from: host mappings of each guest RAM region.

use std::marker::PhantomData;

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Result, SnapshotError};
use crate::layout::{self, MemoryRegion, PAGE_SIZE};
use crate::page_bitmap::PageBitmap;

/// One region's host mapping.
#[derive(Clone, Copy, Debug)]
struct HostRegion {
    guest_addr: u64,
    host_ptr: *const u8,
    len: usize,
}

/// Guest RAM borrowed for the duration of a snapshot write.
///
/// The guest (vCPUs and any device thread writing guest memory) must be paused while a
/// `MemorySource` is in use: its bytes are read as ordinary memory.
pub struct MemorySource<'a> {
    regions: Vec<HostRegion>,
    layout: Vec<MemoryRegion>,
    _borrow: PhantomData<&'a [u8]>,
}

impl<'a> MemorySource<'a> {
    /// Every region of a vm-memory guest memory, in guest address order.
    pub fn from_guest_memory<B: Bitmap>(memory: &'a GuestMemoryMmap<B>) -> Result<Self> {
        let regions = memory
            .iter()
            .map(|region| HostRegion {
                guest_addr: region.start_addr().0,
                host_ptr: region.as_ptr().cast_const(),
                len: region.size(),
            })
            .collect();
        Self::new(regions)
    }

    /// Regions given as `(guest_addr, bytes)`, sorted by guest address.
    pub fn from_slices(slices: &'a [(u64, &'a [u8])]) -> Result<Self> {
        let regions = slices
            .iter()
            .map(|&(guest_addr, bytes)| HostRegion {
                guest_addr,
                host_ptr: bytes.as_ptr(),
                len: bytes.len(),
            })
            .collect();
        Self::new(regions)
    }

    fn new(regions: Vec<HostRegion>) -> Result<Self> {
        let ranges: Vec<(u64, u64)> = regions
            .iter()
            .map(|r| (r.guest_addr, r.len as u64))
            .collect();
        let layout = layout::compute_layout(&ranges).map_err(SnapshotError::InvalidMemory)?;
        Ok(Self {
            regions,
            layout,
            _borrow: PhantomData,
        })
    }

    /// Where each region goes in the memory file.
    pub fn layout(&self) -> &[MemoryRegion] {
        &self.layout
    }

    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// The bytes of region `index`.
    pub(crate) fn region_bytes(&self, index: usize) -> Option<&[u8]> {
        let region = self.regions.get(index)?;
        // SAFETY: the pointer and length describe a live mapping borrowed for `'a` (either a
        // slice or a region of a `GuestMemoryMmap` we hold a reference to). The caller
        // guarantees the guest is paused, so nothing writes these bytes while we read them.
        Some(unsafe { std::slice::from_raw_parts(region.host_ptr, region.len) })
    }
}

/// Takes (and clears) the pages the VMM itself wrote through `memory` — virtio rings, block
/// reads, net RX — which KVM's dirty log does not see. One bitmap per region, ready to OR with
/// the KVM dirty log of the matching memory slot.
pub fn take_vmm_dirty_pages(memory: &GuestMemoryMmap<AtomicBitmap>) -> Vec<PageBitmap> {
    memory
        .iter()
        .map(|region| {
            let words = region.get_mmap().bitmap().get_and_reset();
            PageBitmap::from_words(region.size() as u64 / PAGE_SIZE, &words)
        })
        .collect()
}

/// True when the page contains only zero bytes. Reads 64 bytes per step so the compiler can
/// vectorise, and stops at the first non-zero block (most non-zero pages fail immediately).
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    for block in &mut blocks {
        let mut acc = 0u64;
        for word in block.chunks_exact(8) {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(word);
            acc |= u64::from_ne_bytes(raw);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        page[4095] = 0;
        page[0] = 0x80;
        assert!(!is_zero(&page));
        assert!(is_zero(&[0u8; 3]));
        assert!(!is_zero(&[0, 0, 1]));
    }

    #[test]
    fn vmm_dirty_pages_are_taken_and_reset() {
        use vm_memory::{Bytes, GuestAddress};
        let memory: GuestMemoryMmap<AtomicBitmap> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x100000), 0x4000),
        ])
        .unwrap();
        memory.write_obj(7u32, GuestAddress(0x3000)).unwrap();
        memory
            .write_slice(&[1u8; 0x1800], GuestAddress(0x101800))
            .unwrap();
        let dirty = take_vmm_dirty_pages(&memory);
        assert_eq!(dirty.len(), 2);
        assert_eq!(dirty[0].runs().collect::<Vec<_>>(), vec![(3, 1)]);
        assert_eq!(dirty[1].runs().collect::<Vec<_>>(), vec![(1, 2)]);
        assert!(take_vmm_dirty_pages(&memory)
            .iter()
            .all(PageBitmap::is_empty));
    }

    #[test]
    fn source_from_guest_memory_matches_regions() {
        let memory: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
            (vm_memory::GuestAddress(0), 0x4000),
            (vm_memory::GuestAddress(0x10_0000), 0x2000),
        ])
        .unwrap();
        let source = MemorySource::from_guest_memory(&memory).unwrap();
        assert_eq!(source.region_count(), 2);
        assert_eq!(source.layout()[1].guest_addr, 0x10_0000);
        assert_eq!(source.layout()[1].file_offset, 0x4000);
        assert_eq!(source.region_bytes(1).unwrap().len(), 0x2000);
        assert!(source.region_bytes(2).is_none());
    }
}
