//! Guest physical memory layout for x86_64 direct boot.
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_0520  IDT (empty)
//! 0x0000_7000  zero page      0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map of the first 1 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (e820-reserved up to 0xa0000)
//! 0x0010_0000  kernel (bzImage protected-mode part, or ELF segments at their physical addresses)
//! 0xc000_0000 .. 0x1_0000_0000  32-bit MMIO hole: virtio-mmio windows, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above 3 GiB continues here
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// The kernel reads the command line up to this size (COMMAND_LINE_SIZE on x86_64).
pub const CMDLINE_MAX_SIZE: usize = 2048;
pub const MPTABLE_ADDR: u64 = 0x9fc00;
pub const EBDA_END: u64 = 0xa0000;
pub const BIOS_ROM_START: u64 = 0xf0000;
pub const HIMEM_START: u64 = 0x10_0000;

pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows are allocated upwards from here, 4 KiB each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// KVM needs three pages for the TSS and one for the identity map, below 4 GiB, outside RAM.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Legacy IRQs below this are ISA; virtio devices take IRQs from `FIRST_DEVICE_IRQ` upwards.
/// The i8042's keyboard interrupt.
pub const KEYBOARD_IRQ: u32 = 1;
pub const SERIAL_IRQ: u32 = 4;
pub const FIRST_DEVICE_IRQ: u32 = 5;
pub const IOAPIC_PINS: u32 = 24;

/// Guest RAM ranges for a guest of `mem_size` bytes: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_split_around_the_mmio_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
    }
}
