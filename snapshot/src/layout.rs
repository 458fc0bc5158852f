//! Where each guest memory region lives in `memory.bin`: regions sorted by guest address, laid
//! out back to back, each starting at a page-aligned file offset.

use serde::{Deserialize, Serialize};

/// The memory file of a snapshot directory (holes where the guest never wrote).
pub const MEMORY_FILE: &str = "memory.bin";

/// Snapshot page granularity (x86 base pages; also KVM's dirty-log granularity).
pub const PAGE_SIZE: u64 = 4096;
/// Bounds work done on behalf of a manifest; real VMs have a handful of regions.
pub const MAX_REGIONS: usize = 4096;

/// One guest RAM region and its place in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
    /// Offset of the region's first byte in `memory.bin`.
    pub file_offset: u64,
}

impl MemoryRegion {
    /// Index of the region's first page in the memory file.
    pub fn first_page(&self) -> u64 {
        self.file_offset / PAGE_SIZE
    }

    pub fn page_count(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// Assigns file offsets to `(guest_addr, size)` regions, checking alignment and overlap.
pub fn compute_layout(ranges: &[(u64, u64)]) -> Result<Vec<MemoryRegion>, String> {
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for &(guest_addr, size) in ranges {
        regions.push(MemoryRegion {
            guest_addr,
            size,
            file_offset: offset,
        });
        offset = offset
            .checked_add(size)
            .ok_or_else(|| "total memory size overflows".to_string())?;
    }
    validate_layout(&regions)?;
    Ok(regions)
}

/// Checks a region list read from disk or built from guest memory. Returns the memory file's
/// length (the end of the last region).
pub fn validate_layout(regions: &[MemoryRegion]) -> Result<u64, String> {
    if regions.is_empty() {
        return Err("no memory regions".into());
    }
    if regions.len() > MAX_REGIONS {
        return Err(format!(
            "{} memory regions (limit {MAX_REGIONS})",
            regions.len()
        ));
    }
    let mut expected_offset = 0u64;
    let mut previous_end: Option<u64> = None;
    for (index, region) in regions.iter().enumerate() {
        if region.size == 0 || region.size % PAGE_SIZE != 0 {
            return Err(format!(
                "region {index}: size {:#x} is not a non-zero multiple of {PAGE_SIZE}",
                region.size
            ));
        }
        if region.guest_addr % PAGE_SIZE != 0 {
            return Err(format!(
                "region {index}: guest address {:#x} is not page aligned",
                region.guest_addr
            ));
        }
        let end = region
            .guest_addr
            .checked_add(region.size)
            .ok_or_else(|| format!("region {index}: guest address range overflows"))?;
        if let Some(previous_end) = previous_end {
            if region.guest_addr < previous_end {
                return Err(format!(
                    "region {index}: overlaps or is not sorted after the previous region"
                ));
            }
        }
        if region.file_offset != expected_offset {
            return Err(format!(
                "region {index}: file offset {:#x}, expected {expected_offset:#x}",
                region.file_offset
            ));
        }
        expected_offset = expected_offset
            .checked_add(region.size)
            .ok_or_else(|| "total memory size overflows".to_string())?;
        previous_end = Some(end);
    }
    Ok(expected_offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_packed_back_to_back() {
        let layout = compute_layout(&[(0, 0x10000), (0x1_0000_0000, 0x2000)]).unwrap();
        assert_eq!(layout[0].file_offset, 0);
        assert_eq!(layout[1].file_offset, 0x10000);
        assert_eq!(layout[1].first_page(), 16);
        assert_eq!(validate_layout(&layout).unwrap(), 0x12000);
    }

    #[test]
    fn bad_layouts_are_refused() {
        assert!(compute_layout(&[]).is_err());
        assert!(compute_layout(&[(0, 0x1001)]).is_err());
        assert!(compute_layout(&[(0x10, 0x1000)]).is_err());
        assert!(compute_layout(&[(0, 0x2000), (0x1000, 0x1000)]).is_err());
        assert!(compute_layout(&[(0x4000, 0x1000), (0, 0x1000)]).is_err());
        assert!(compute_layout(&[(u64::MAX - 0xfff, 0x2000)]).is_err());
        let mut layout = compute_layout(&[(0, 0x1000), (0x1000, 0x1000)]).unwrap();
        layout[1].file_offset = 0x2000;
        assert!(validate_layout(&layout).is_err());
    }
}
