//! The boot GDT: null, null, 64-bit code, data, TSS — the selectors Linux's 64-bit boot protocol
//! expects (__BOOT_CS = 0x10, __BOOT_DS = 0x18).

use kvm_bindings::kvm_segment;

pub const CODE_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;

/// Entries in GDT order, packed as the CPU reads them.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // code: present, exec/read, long mode, 4K granularity
        gdt_entry(0xc093, 0, 0xfffff), // data: present, read/write, 32-bit, 4K granularity
        gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS
    ]
}

/// Encodes a descriptor from `flags` (access byte in bits 0–7, flags nibble in bits 12–15),
/// a 32-bit base and a 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment register value that the descriptor at `index` describes.
pub fn segment_from_entry(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4K granularity the effective limit is in pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_long_mode_ring0() {
        let gdt = boot_gdt();
        let cs = segment_from_entry(gdt[2], 2);
        assert_eq!(cs.selector, CODE_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_entry(gdt[3], 3);
        assert_eq!(ds.selector, DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let tss = segment_from_entry(gdt[4], 4);
        assert_eq!((tss.selector, tss.s, tss.type_), (TSS_SELECTOR, 0, 0xb));
    }

    #[test]
    fn encoding_matches_known_values() {
        // The classic flat 64-bit code descriptor.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let e = gdt_entry(0x808b, 0x1234_5678, 0xabcde);
        let s = segment_from_entry(e, 4);
        assert_eq!(s.base, 0x1234_5678);
    }
}
