//! Guest RAM: anonymous, lazily populated mappings (MAP_NORESERVE), with a per-page bitmap of
//! writes the VMM itself makes (KVM's dirty log only sees the guest's).

use vm_memory::GuestAddress;

use crate::boot::layout::ram_ranges;
use devices::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small (the minimum is {MIN_MEM_MIB} MiB)")]
    TooSmall(u64),
    #[error("guest memory of {0} MiB is too large for this host's address space")]
    TooLarge(u64),
    #[error("cannot map guest memory: {0}")]
    Map(vm_memory::mmap::FromRangesError),
}

pub const MIN_MEM_MIB: u64 = 8;

pub fn create_guest_memory(mem_mib: u64) -> Result<GuestMemory, MemoryError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mem_mib));
    }
    let size = mem_mib
        .checked_mul(1 << 20)
        .filter(|s| *s <= 1 << 46)
        .ok_or(MemoryError::TooLarge(mem_mib))?;
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(MemoryError::Map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn sizes_and_limits() {
        let m = create_guest_memory(64).unwrap();
        assert_eq!(m.num_regions(), 1);
        assert_eq!(m.last_addr(), GuestAddress((64 << 20) - 1));
        assert!(matches!(
            create_guest_memory(1),
            Err(MemoryError::TooSmall(1))
        ));
        assert!(matches!(
            create_guest_memory(u64::MAX),
            Err(MemoryError::TooLarge(_))
        ));
    }
}
