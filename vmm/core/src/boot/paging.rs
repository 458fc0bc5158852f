//! Identity page tables for the first 1 GiB (2 MiB pages): enough for the boot CPU to reach the
//! kernel entry, the zero page and the command line; the kernel builds its own tables at once.

use super::layout::{PDPT_ADDR, PD_ADDR, PML4_ADDR};

const PRESENT_WRITABLE: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// (guest address, value) pairs to write, one u64 each.
pub fn identity_map_entries() -> Vec<(u64, u64)> {
    let mut entries = Vec::with_capacity(514);
    entries.push((PML4_ADDR, PDPT_ADDR | PRESENT_WRITABLE));
    entries.push((PDPT_ADDR, PD_ADDR | PRESENT_WRITABLE));
    for i in 0..512u64 {
        entries.push((PD_ADDR + i * 8, (i << 21) | PRESENT_WRITABLE | PAGE_SIZE_2M));
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU would for a virtual address in the first GiB.
    fn translate(entries: &[(u64, u64)], vaddr: u64) -> Option<u64> {
        let read = |addr: u64| entries.iter().find(|(a, _)| *a == addr).map(|(_, v)| *v);
        let pml4e = read(PML4_ADDR + ((vaddr >> 39) & 0x1ff) * 8)?;
        let pdpte = read((pml4e & !0xfff) + ((vaddr >> 30) & 0x1ff) * 8)?;
        let pde = read((pdpte & !0xfff) + ((vaddr >> 21) & 0x1ff) * 8)?;
        assert_eq!(pde & PAGE_SIZE_2M, PAGE_SIZE_2M);
        Some((pde & !0x1f_ffff & !PAGE_SIZE_2M & !PRESENT_WRITABLE) | (vaddr & 0x1f_ffff))
    }

    #[test]
    fn first_gib_is_identity_mapped() {
        let entries = identity_map_entries();
        for addr in [0u64, 0x7000, 0x100_0000, 0x3fff_ffff, 0x1234_5678] {
            assert_eq!(translate(&entries, addr), Some(addr));
        }
        assert_eq!(translate(&entries, 0x4000_0000), None);
    }
}
