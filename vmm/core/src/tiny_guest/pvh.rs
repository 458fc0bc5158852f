//! The tiny guest in a form other VMMs load too: the same ELF64 image with, besides its 64-bit
//! entry (`e_entry`, which dormouse and Firecracker's Linux boot path jump to with paging on), a
//! PVH entry (`XEN_ELFNOTE_PHYS32_ENTRY` note) into 32-bit code with paging off, which QEMU
//! (`-kernel`), Cloud Hypervisor (`--kernel`) and PVH-capable Firecracker use. Both entries do
//! the same thing: print the same lines to the serial port, write the same pages (one non-zero
//! byte per 4 KiB page from just after the image up to the fixed size), and halt with interrupts
//! off, so every VMM snapshots a guest with the same memory in use.

use super::{
    code, extra_page_directories, extra_pd_offset, touch_start, TinyGuestEnd, EHDR_LEN, EXTRA_PDS,
    LOAD_ADDR, PAGE, PHDR_LEN, TINY_GUEST_MESSAGE, TINY_GUEST_TOUCHED, TOUCH_LIMIT,
};

/// Xen's ELF note type for the 32-bit PVH entry point (the PVH boot ABI).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const NOTE_NAME: &[u8; 4] = b"Xen\0";
/// namesz, descsz, type, "Xen\0", the 32-bit entry address.
const NOTE_LEN: usize = 12 + 4 + 4;
const NOTE_OFFSET: usize = EHDR_LEN + 2 * PHDR_LEN;
/// The 64-bit code starts 16-byte aligned after the note.
const CODE64_OFFSET: usize = (NOTE_OFFSET + NOTE_LEN + 15) & !15;

/// 32-bit (protected mode, paging off) version of `super::code`.
fn code32(end: TinyGuestEnd) -> Vec<u8> {
    let mut c = Vec::new();
    // `mov dx, imm16; mov al, imm8; out dx, al` encode the same in 32- and 64-bit mode.
    super::print(&mut c, TINY_GUEST_MESSAGE);
    match end {
        TinyGuestEnd::Reset => c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]), // out 0x64, 0xfe
        TinyGuestEnd::Idle => c.push(0xfa),                                    // cli
        TinyGuestEnd::TouchAll { mem_bytes } => {
            touch_code32(&mut c, mem_bytes);
            super::print(&mut c, TINY_GUEST_TOUCHED);
            c.push(0xfa); // cli
        }
        TinyGuestEnd::WriteForever { mem_bytes } => {
            super::write_forever_code(&mut c, mem_bytes, super::Bits::B32);
        }
    }
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp back to hlt
    c
}

/// `for page in start..end: *page = 1` on physical addresses (no paging), the same pages as the
/// 64-bit loop writes.
fn touch_code32(c: &mut Vec<u8>, mem_bytes: u64) {
    let end = (mem_bytes.min(TOUCH_LIMIT) & !(PAGE - 1)).max(touch_start());
    // TOUCH_LIMIT is below 4 GiB, so both addresses fit 32 bits.
    let start = u32::try_from(touch_start()).unwrap_or(u32::MAX);
    let end = u32::try_from(end).unwrap_or(u32::MAX);
    c.push(0xb8); // mov eax, start
    c.extend_from_slice(&start.to_le_bytes());
    c.push(0xba); // mov edx, end
    c.extend_from_slice(&end.to_le_bytes());
    let body = [
        0xc6, 0x00, 0x01, // loop: mov byte [eax], 1
        0x05, 0x00, 0x10, 0x00, 0x00, // add eax, 0x1000
        0x39, 0xd0, // cmp eax, edx
        0x72, // jb loop
    ];
    c.extend_from_slice(&body);
    c.push((-(body.len() as i8 + 1)) as u8);
}

fn put_u16(f: &mut Vec<u8>, v: u16) {
    f.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(f: &mut Vec<u8>, v: u32) {
    f.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(f: &mut Vec<u8>, v: u64) {
    f.extend_from_slice(&v.to_le_bytes());
}

/// The whole ELF file: header, a PT_LOAD of the whole file at 1 MiB, a PT_NOTE with the PVH
/// entry, the 64-bit code, the 32-bit code and (touching guest) the page directories the 64-bit
/// code needs above 1 GiB.
pub fn portable_elf_image(end: TinyGuestEnd) -> Vec<u8> {
    let code64 = code(end);
    let code32 = code32(end);
    let code32_offset = CODE64_OFFSET + code64.len();
    let code_end = (code32_offset + code32.len()) as u64;
    let file_len = match end {
        TinyGuestEnd::TouchAll { .. } | TinyGuestEnd::WriteForever { .. } => {
            extra_pd_offset() + EXTRA_PDS * PAGE
        }
        _ => code_end,
    };
    let entry64 = LOAD_ADDR + CODE64_OFFSET as u64;
    // The image sits at 1 MiB and is a few KiB long: well inside 32 bits.
    let entry32 = u32::try_from(LOAD_ADDR + code32_offset as u64).unwrap_or(u32::MAX);

    let mut f = Vec::with_capacity(file_len as usize);
    // ELF header
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    f.extend_from_slice(&[0; 8]);
    put_u16(&mut f, 2); // ET_EXEC
    put_u16(&mut f, 0x3e); // EM_X86_64
    put_u32(&mut f, 1);
    put_u64(&mut f, entry64); // e_entry
    put_u64(&mut f, EHDR_LEN as u64); // e_phoff
    put_u64(&mut f, 0); // e_shoff
    put_u32(&mut f, 0); // e_flags
    put_u16(&mut f, EHDR_LEN as u16);
    put_u16(&mut f, PHDR_LEN as u16);
    put_u16(&mut f, 2); // e_phnum
    put_u16(&mut f, 64); // e_shentsize
    put_u16(&mut f, 0); // e_shnum
    put_u16(&mut f, 0); // e_shstrndx

    // PT_LOAD of the whole file, R+X.
    put_u32(&mut f, 1);
    put_u32(&mut f, 5);
    put_u64(&mut f, 0); // p_offset
    put_u64(&mut f, LOAD_ADDR); // p_vaddr
    put_u64(&mut f, LOAD_ADDR); // p_paddr
    put_u64(&mut f, file_len); // p_filesz
    put_u64(&mut f, file_len); // p_memsz
    put_u64(&mut f, PAGE); // p_align

    // PT_NOTE over the PVH note.
    let note_addr = LOAD_ADDR + NOTE_OFFSET as u64;
    put_u32(&mut f, 4);
    put_u32(&mut f, 4); // R
    put_u64(&mut f, NOTE_OFFSET as u64);
    put_u64(&mut f, note_addr);
    put_u64(&mut f, note_addr);
    put_u64(&mut f, NOTE_LEN as u64);
    put_u64(&mut f, NOTE_LEN as u64);
    put_u64(&mut f, 4);

    // The note: namesz, descsz, type, name, entry.
    put_u32(&mut f, NOTE_NAME.len() as u32);
    put_u32(&mut f, 4);
    put_u32(&mut f, XEN_ELFNOTE_PHYS32_ENTRY);
    f.extend_from_slice(NOTE_NAME);
    put_u32(&mut f, entry32);

    f.resize(CODE64_OFFSET, 0);
    f.extend_from_slice(&code64);
    f.extend_from_slice(&code32);
    if let TinyGuestEnd::TouchAll { .. } | TinyGuestEnd::WriteForever { .. } = end {
        // The code fits in the first page; the page directories follow, page-aligned.
        f.resize(extra_pd_offset() as usize, 0);
        f.extend_from_slice(&extra_page_directories());
    }
    f
}

/// Writes the portable image to `path`.
pub fn write_portable_to(path: &std::path::Path, end: TinyGuestEnd) -> std::io::Result<()> {
    std::fs::write(path, portable_elf_image(end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::loader::{detect_format, elf_first_load_vaddr, KernelFormat};

    fn u16_at(img: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(img[off..off + 2].try_into().unwrap())
    }
    fn u32_at(img: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(img[off..off + 4].try_into().unwrap())
    }
    fn u64_at(img: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(img[off..off + 8].try_into().unwrap())
    }

    /// The file offset of a guest-physical address inside the image.
    fn offset_of(addr: u64) -> usize {
        (addr - LOAD_ADDR) as usize
    }

    #[test]
    fn header_has_a_load_and_a_note_segment() {
        let img = portable_elf_image(TinyGuestEnd::Idle);
        assert_eq!(detect_format(&img), Some(KernelFormat::Elf));
        assert_eq!(elf_first_load_vaddr(&img), Some(LOAD_ADDR));
        assert_eq!(img[4], 2, "ELFCLASS64");
        assert_eq!(u16_at(&img, 0x12), 0x3e, "EM_X86_64");
        assert_eq!(u16_at(&img, 0x38), 2, "e_phnum");
        let load = EHDR_LEN;
        assert_eq!(u32_at(&img, load), 1, "PT_LOAD");
        assert_eq!(u64_at(&img, load + 0x18), LOAD_ADDR, "p_paddr");
        assert_eq!(u64_at(&img, load + 0x20), img.len() as u64, "p_filesz");
        let note = EHDR_LEN + PHDR_LEN;
        assert_eq!(u32_at(&img, note), 4, "PT_NOTE");
        assert_eq!(u64_at(&img, note + 8), NOTE_OFFSET as u64, "p_offset");
        assert_eq!(u64_at(&img, note + 0x20), NOTE_LEN as u64, "p_filesz");
    }

    #[test]
    fn pvh_note_points_at_the_32_bit_code() {
        for end in [
            TinyGuestEnd::Reset,
            TinyGuestEnd::Idle,
            TinyGuestEnd::TouchAll { mem_bytes: 2 << 30 },
        ] {
            let img = portable_elf_image(end);
            assert_eq!(u32_at(&img, NOTE_OFFSET), 4, "namesz");
            assert_eq!(u32_at(&img, NOTE_OFFSET + 4), 4, "descsz");
            assert_eq!(
                u32_at(&img, NOTE_OFFSET + 8),
                XEN_ELFNOTE_PHYS32_ENTRY,
                "type"
            );
            assert_eq!(&img[NOTE_OFFSET + 12..NOTE_OFFSET + 16], b"Xen\0");
            let entry32 = u64::from(u32_at(&img, NOTE_OFFSET + 16));
            let code = code32(end);
            let at = offset_of(entry32);
            assert_eq!(&img[at..at + code.len()], &code[..], "{end:?}");
            // 64-bit entry: the 64-bit code, unchanged from the dormouse-only image.
            let entry64 = u64_at(&img, 0x18);
            let code = super::super::code(end);
            let at = offset_of(entry64);
            assert_eq!(&img[at..at + code.len()], &code[..], "{end:?}");
        }
    }

    #[test]
    fn both_entries_print_the_same_line_first() {
        let c = code32(TinyGuestEnd::Idle);
        assert_eq!(&c[..4], &[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
        assert_eq!(&c[4..7], &[0xb0, TINY_GUEST_MESSAGE[0], 0xee]);
        assert!(c.ends_with(&[0xfa, 0xf4, 0xeb, 0xfd]));
        assert!(code32(TinyGuestEnd::Reset).ends_with(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]));
    }

    #[test]
    fn touch_loop_32_covers_the_same_pages_as_the_64_bit_one() {
        let mut c = Vec::new();
        touch_code32(&mut c, 256 << 20);
        assert_eq!(c[0], 0xb8);
        assert_eq!(u64::from(u32_at(&c, 1)), touch_start());
        assert_eq!(c[5], 0xba);
        assert_eq!(u32_at(&c, 6), 256 << 20);
        let loop_start = 10;
        assert_eq!(&c[loop_start..loop_start + 3], &[0xc6, 0x00, 0x01]);
        assert_eq!(c[c.len() - 2], 0x72);
        assert_eq!(c[c.len() - 1] as i8, -12, "jb back to the store");
        // Capped at the RAM below the 32-bit hole, like the 64-bit loop.
        let mut c = Vec::new();
        touch_code32(&mut c, 8 << 30);
        assert_eq!(u64::from(u32_at(&c, 6)), TOUCH_LIMIT);
    }

    #[test]
    fn touching_image_keeps_code_in_its_first_page() {
        let end = TinyGuestEnd::TouchAll { mem_bytes: 3 << 30 };
        let img = portable_elf_image(end);
        assert_eq!(img.len() as u64, PAGE + EXTRA_PDS * PAGE);
        let entry32 = u64::from(u32_at(&img, NOTE_OFFSET + 16));
        assert!(offset_of(entry32) + code32(end).len() <= PAGE as usize);
        assert_eq!(u64_at(&img, PAGE as usize), (1 << 30) | 0x83);
    }
}
