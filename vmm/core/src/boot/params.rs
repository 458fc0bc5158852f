//! The Linux zero page (struct boot_params) and its e820 memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::layout::{
    BIOS_ROM_START, CMDLINE_ADDR, EBDA_END, HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START,
    MPTABLE_ADDR,
};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const LOADFLAG_LOADED_HIGH: u8 = 0x1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's memory map: low RAM below the MP table, the MP table and BIOS area reserved,
/// RAM from 1 MiB to the MMIO hole, and RAM above 4 GiB for large guests.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: MPTABLE_ADDR,
            kind: E820_RAM,
        },
        E820Entry {
            addr: MPTABLE_ADDR,
            size: EBDA_END - MPTABLE_ADDR,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: BIOS_ROM_START,
            size: HIMEM_START - BIOS_ROM_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = mem_size.min(MMIO_HOLE_START);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: MMIO_HOLE_END,
            size: mem_size - MMIO_HOLE_START,
            kind: E820_RAM,
        });
    }
    map
}

pub struct ZeroPageInput {
    /// The bzImage's own setup header; `None` for an ELF vmlinux.
    pub setup_header: Option<setup_header>,
    /// Length of the command line including its NUL.
    pub cmdline_size: u32,
    pub initrd: Option<(u64, u32)>,
    pub mem_size: u64,
}

pub fn build_zero_page(input: &ZeroPageInput) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = input.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADFLAG_LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = input.cmdline_size;
    if let Some((addr, size)) = input.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size;
    }
    let map = e820_map(input.mem_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    params
}

/// Where an initrd of `size` bytes goes: as high as allowed in low RAM, page-aligned, above the
/// kernel. `addr_max` is the kernel's `initrd_addr_max` (the highest byte the initrd may use).
pub fn initrd_address(mem_size: u64, kernel_end: u64, size: u64, addr_max: u64) -> Option<u64> {
    let top = mem_size
        .min(MMIO_HOLE_START)
        .min(addr_max.saturating_add(1));
    let addr = top.checked_sub(size)? & !0xfff;
    (addr >= kernel_end).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_for_small_and_large_guests() {
        let small = e820_map(256 << 20);
        assert_eq!(small.len(), 4);
        assert_eq!(
            small[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(small[1].kind, E820_RESERVED);
        assert_eq!(
            small[3],
            E820Entry {
                addr: 1 << 20,
                size: (256 << 20) - (1 << 20),
                kind: E820_RAM
            }
        );
        let large = e820_map(6 << 30);
        assert_eq!(large.len(), 5);
        assert_eq!(
            large[4],
            E820Entry {
                addr: 4 << 30,
                size: 3 << 30,
                kind: E820_RAM
            }
        );
        let ram: u64 = large
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert!(ram <= 6 << 30);
        // No overlaps, sorted.
        for w in large.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn zero_page_fields() {
        let zp = build_zero_page(&ZeroPageInput {
            setup_header: None,
            cmdline_size: 42,
            initrd: Some((0x0800_0000, 4096)),
            mem_size: 256 << 20,
        });
        let hdr = zp.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x0800_0000);
        assert_eq!({ hdr.ramdisk_size }, 4096);
        assert_eq!(zp.e820_entries, 4);
        let first = zp.e820_table[3];
        assert_eq!({ first.addr }, 1 << 20);
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let addr = initrd_address(256 << 20, 32 << 20, 5000, 0x7fff_ffff).unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + 5000 <= 256 << 20);
        assert!(addr >= (256 << 20) - 8192);
        // Respects initrd_addr_max.
        let addr = initrd_address(1 << 30, 0, 4096, 0x37ff_ffff).unwrap();
        assert!(addr + 4096 <= 0x3800_0000);
        // Too big to fit above the kernel.
        assert_eq!(initrd_address(64 << 20, 32 << 20, 40 << 20, u64::MAX), None);
    }
}
