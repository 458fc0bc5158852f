//! A tiny test guest the project builds itself: an ELF64 image of a few bytes of 64-bit code that
//! writes a line to the serial port and then resets through the i8042, idles, or writes one byte
//! to every page of its memory and then idles. It measures the VMM's own start, exit and
//! snapshot/restore cost, with no guest kernel in the way.

mod pvh;

pub use pvh::{portable_elf_image, write_portable_to, XEN_ELFNOTE_PHYS32_ENTRY};

/// Physical load address (the ELF loader wants segments at or above 1 MiB).
const LOAD_ADDR: u64 = 0x10_0000;
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const PAGE: u64 = 0x1000;
/// The boot page tables map the first GiB (see `boot::layout`): the touching guest carries page
/// directories for GiB 1 and 2 in its image and hooks them into the boot PDPT.
const BOOT_PDPT_ADDR: u64 = 0xa000;
const EXTRA_PDS: u64 = 2;
/// RAM the touching guest can reach: everything below the 32-bit MMIO hole.
pub const TOUCH_LIMIT: u64 = 3 << 30;

/// What the guest does after printing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyGuestEnd {
    /// `out 0x64, 0xfe`: the VMM exits with status 0.
    Reset,
    /// `cli; hlt` forever: the VM idles (for RSS measurements).
    Idle,
    /// Writes a non-zero byte to every page from just after the image up to `mem_bytes` (capped
    /// at `TOUCH_LIMIT`), prints `TINY_GUEST_TOUCHED`, then idles like `Idle`: a guest whose
    /// memory is all in use, for snapshot measurements.
    TouchAll { mem_bytes: u64 },
    /// Writes the same pages as `TouchAll` forever, pass after pass: pass `n` checks that each
    /// page holds `n - 1` (as a u32 at its start) and writes `n`, then prints
    /// `TINY_GUEST_PASS`. A page holding anything else prints `TINY_GUEST_BAD` and halts. A
    /// guest that keeps writing its memory and notices if a snapshot restored it inconsistently
    /// (memory from a different instant than its registers).
    WriteForever { mem_bytes: u64 },
}

/// The message the tiny guest prints.
pub const TINY_GUEST_MESSAGE: &[u8] = b"dormouse-tiny-guest\n";
/// What the `TouchAll` guest prints once every page is written.
pub const TINY_GUEST_TOUCHED: &[u8] = b"dormouse-tiny-guest: touched\n";
/// What the `WriteForever` guest prints after each pass over its memory.
pub const TINY_GUEST_PASS: &[u8] = b"tiny-pass\n";
/// What the `WriteForever` guest prints when a page does not hold what it wrote there.
pub const TINY_GUEST_BAD: &[u8] = b"tiny-BAD\n";

fn print(c: &mut Vec<u8>, text: &[u8]) {
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    for &b in text {
        c.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
}

fn mov_rax_imm64(c: &mut Vec<u8>, v: u64) {
    c.extend_from_slice(&[0x48, 0xb8]);
    c.extend_from_slice(&v.to_le_bytes());
}

/// Where the touching guest's extra page directories sit (file offset, page-aligned).
fn extra_pd_offset() -> u64 {
    PAGE
}

/// The first page the touching guest writes: after its code and page directories.
fn touch_start() -> u64 {
    LOAD_ADDR + extra_pd_offset() + EXTRA_PDS * PAGE
}

/// `pdpt[1..=EXTRA_PDS] = extra PDs; reload cr3; for page in start..end: *page = 1`.
fn touch_code(c: &mut Vec<u8>, mem_bytes: u64) {
    map_extra_gibs(c);
    let end = mem_bytes.min(TOUCH_LIMIT) & !(PAGE - 1);
    mov_rax_imm64(c, touch_start());
    c.extend_from_slice(&[0x48, 0xba]); // mov rdx, end
    c.extend_from_slice(&end.max(touch_start()).to_le_bytes());
    let body = [
        0xc6, 0x00, 0x01, // loop: mov byte [rax], 1
        0x48, 0x05, 0x00, 0x10, 0x00, 0x00, // add rax, 0x1000
        0x48, 0x39, 0xd0, // cmp rax, rdx
        0x72, // jb loop
    ];
    c.extend_from_slice(&body);
    c.push((-(body.len() as i8 + 1)) as u8);
}

/// How the `WriteForever` loop addresses memory: 64-bit code (`mov r64, imm64`, REX.W
/// arithmetic) or 32-bit code without paging (the PVH entry).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bits {
    B64,
    B32,
}

/// The `WriteForever` passes (after `map_extra_gibs` in 64-bit code): ecx is the pass, ebx
/// the value the pass expects, rax walks the pages up to rdx. The instructions on ebx/ecx
/// and the memory operands encode the same in both modes.
pub(crate) fn write_forever_code(c: &mut Vec<u8>, mem_bytes: u64, bits: Bits) {
    let end = (mem_bytes.min(TOUCH_LIMIT) & !(PAGE - 1)).max(touch_start());
    let rex_w: &[u8] = if bits == Bits::B64 { &[0x48] } else { &[] };
    let imm = |c: &mut Vec<u8>, v: u64| match bits {
        Bits::B64 => c.extend_from_slice(&v.to_le_bytes()),
        // Below TOUCH_LIMIT (3 GiB): fits 32 bits.
        Bits::B32 => c.extend_from_slice(&u32::try_from(v).unwrap_or(u32::MAX).to_le_bytes()),
    };
    c.extend_from_slice(&[0xb9, 1, 0, 0, 0]); // mov ecx, 1
    let outer = c.len();
    c.extend_from_slice(rex_w);
    c.push(0xb8); // mov rax, start
    imm(c, touch_start());
    c.extend_from_slice(rex_w);
    c.push(0xba); // mov rdx, end
    imm(c, end);
    c.extend_from_slice(&[0x8d, 0x59, 0xff]); // lea ebx, [rcx - 1]
    let inner = c.len();
    c.extend_from_slice(&[0x39, 0x18]); // cmp [rax], ebx
    c.extend_from_slice(&[0x75, 0]); // jne bad (patched below)
    let jne_end = c.len();
    c.extend_from_slice(&[0x89, 0x08]); // mov [rax], ecx
    c.extend_from_slice(rex_w);
    c.extend_from_slice(&[0x05, 0x00, 0x10, 0x00, 0x00]); // add rax, 0x1000
    c.extend_from_slice(rex_w);
    c.extend_from_slice(&[0x39, 0xd0]); // cmp rax, rdx
    let back = inner as isize - (c.len() + 2) as isize;
    c.extend_from_slice(&[0x72, back as i8 as u8]); // jb inner
    print(c, TINY_GUEST_PASS);
    c.extend_from_slice(&[0xff, 0xc1]); // inc ecx
    let back = outer as isize - (c.len() + 5) as isize;
    c.push(0xe9); // jmp outer
    c.extend_from_slice(&(back as i32).to_le_bytes());
    let bad = c.len();
    c[jne_end - 1] = (bad - jne_end) as u8;
    print(c, TINY_GUEST_BAD);
    c.push(0xfa); // cli (the common tail halts)
}

/// `pdpt[1..=EXTRA_PDS] = extra PDs; reload cr3`: 64-bit code reaches memory above 1 GiB.
fn map_extra_gibs(c: &mut Vec<u8>) {
    for gib in 1..=EXTRA_PDS {
        let pd = LOAD_ADDR + extra_pd_offset() + (gib - 1) * PAGE;
        mov_rax_imm64(c, pd | 0x3); // present, writable
        c.extend_from_slice(&[0x48, 0x89, 0x04, 0x25]); // mov [disp32], rax
        c.extend_from_slice(&((BOOT_PDPT_ADDR + gib * 8) as u32).to_le_bytes());
    }
    c.extend_from_slice(&[0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8]); // mov rax, cr3; mov cr3, rax
}

fn code(end: TinyGuestEnd) -> Vec<u8> {
    let mut c = Vec::new();
    print(&mut c, TINY_GUEST_MESSAGE);
    match end {
        TinyGuestEnd::Reset => c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]), // out 0x64, 0xfe
        TinyGuestEnd::Idle => c.push(0xfa),                                    // cli
        TinyGuestEnd::TouchAll { mem_bytes } => {
            touch_code(&mut c, mem_bytes);
            print(&mut c, TINY_GUEST_TOUCHED);
            c.push(0xfa); // cli
        }
        TinyGuestEnd::WriteForever { mem_bytes } => {
            map_extra_gibs(&mut c);
            write_forever_code(&mut c, mem_bytes, Bits::B64);
        }
    }
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp back to hlt
    c
}

/// Page directories mapping GiB 1..=EXTRA_PDS with 2 MiB pages.
fn extra_page_directories() -> Vec<u8> {
    let mut pds = Vec::with_capacity((EXTRA_PDS * PAGE) as usize);
    for gib in 1..=EXTRA_PDS {
        for i in 0..512u64 {
            let entry = (gib << 30) | (i << 21) | 0x83; // present, writable, 2 MiB page
            pds.extend_from_slice(&entry.to_le_bytes());
        }
    }
    pds
}

/// The whole ELF file.
pub fn elf_image(end: TinyGuestEnd) -> Vec<u8> {
    let code = code(end);
    let code_off = (EHDR_LEN + PHDR_LEN) as u64;
    let code_end = code_off + code.len() as u64;
    let file_len = match end {
        TinyGuestEnd::TouchAll { .. } | TinyGuestEnd::WriteForever { .. } => {
            extra_pd_offset() + EXTRA_PDS * PAGE
        }
        _ => code_end,
    };
    let mut f = Vec::with_capacity(file_len as usize);
    // ELF header
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&(LOAD_ADDR + code_off).to_le_bytes()); // e_entry
    f.extend_from_slice(&(EHDR_LEN as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR_LEN as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR_LEN as u16).to_le_bytes());
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                              // Program header: one PT_LOAD of the whole file.
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    f.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    f.extend_from_slice(&file_len.to_le_bytes()); // p_filesz
    f.extend_from_slice(&file_len.to_le_bytes()); // p_memsz
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    f.extend_from_slice(&code);
    if let TinyGuestEnd::TouchAll { .. } | TinyGuestEnd::WriteForever { .. } = end {
        // The code fits in the first page; the page directories follow, page-aligned.
        f.resize(extra_pd_offset() as usize, 0);
        f.extend_from_slice(&extra_page_directories());
    }
    f
}

/// Writes the image to `path`.
pub fn write_to(path: &std::path::Path, end: TinyGuestEnd) -> std::io::Result<()> {
    std::fs::write(path, elf_image(end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::loader::{detect_format, elf_first_load_vaddr, KernelFormat};

    #[test]
    fn image_is_a_loadable_elf() {
        let img = elf_image(TinyGuestEnd::Reset);
        assert_eq!(detect_format(&img), Some(KernelFormat::Elf));
        assert_eq!(elf_first_load_vaddr(&img), Some(LOAD_ADDR));
        let entry = u64::from_le_bytes(img[24..32].try_into().unwrap());
        assert_eq!(entry, LOAD_ADDR + 120);
        // The code ends in the reset write and a hlt loop.
        assert!(img.ends_with(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]));
        assert!(elf_image(TinyGuestEnd::Idle).ends_with(&[0xfa, 0xf4, 0xeb, 0xfd]));
    }

    #[test]
    fn touching_image_carries_page_directories_after_its_code() {
        let img = elf_image(TinyGuestEnd::TouchAll { mem_bytes: 2 << 30 });
        assert_eq!(img.len() as u64, PAGE + EXTRA_PDS * PAGE);
        let code_len = code(TinyGuestEnd::TouchAll { mem_bytes: 2 << 30 }).len();
        assert!(EHDR_LEN + PHDR_LEN + code_len <= PAGE as usize);
        // PD for GiB 1, entry 0 maps 1 GiB with a 2 MiB page; the last entry of GiB 2.
        let entry = |off: usize| u64::from_le_bytes(img[off..off + 8].try_into().unwrap());
        assert_eq!(entry(PAGE as usize), (1 << 30) | 0x83);
        assert_eq!(
            entry((PAGE + 2 * PAGE) as usize - 8),
            (2 << 30) | (511 << 21) | 0x83
        );
        // The segment covers the whole file.
        let filesz = u64::from_le_bytes(img[EHDR_LEN + 32..EHDR_LEN + 40].try_into().unwrap());
        assert_eq!(filesz, img.len() as u64);
    }

    #[test]
    fn write_forever_jumps_land_on_their_instructions() {
        for bits in [Bits::B64, Bits::B32] {
            let mut c = Vec::new();
            write_forever_code(&mut c, 256 << 20, bits);
            let find =
                |pattern: &[u8]| c.windows(pattern.len()).position(|w| w == pattern).unwrap();
            // jne (after cmp [rax], ebx) lands on the BAD message's first port write.
            let cmp = find(&[0x39, 0x18, 0x75]);
            let jne_end = cmp + 4;
            let bad = jne_end + c[cmp + 3] as usize;
            assert_eq!(&c[bad..bad + 4], &[0x66, 0xba, 0xf8, 0x03], "{}", bad);
            assert_eq!(c[bad + 5], TINY_GUEST_BAD[0]);
            // jb goes back to the cmp.
            let jb = find(&[0x39, 0xd0, 0x72]) + 2;
            assert_eq!((jb as isize + 2 + c[jb + 1] as i8 as isize) as usize, cmp);
            // The outer jmp goes back to `mov ecx, 1`'s successor (mov rax/eax, start).
            let jmp = bad - 5;
            assert_eq!(c[jmp], 0xe9);
            let rel = i32::from_le_bytes(c[jmp + 1..jmp + 5].try_into().unwrap());
            let target = (jmp as isize + 5 + rel as isize) as usize;
            assert_eq!(target, 5);
            let mov = if bits == Bits::B64 {
                &[0x48, 0xb8][..]
            } else {
                &[0xb8][..]
            };
            assert_eq!(&c[target..target + mov.len()], mov);
        }
    }

    #[test]
    fn touch_loop_jumps_back_to_its_start() {
        let mut c = Vec::new();
        touch_code(&mut c, 256 << 20);
        // The loop is the last 14 bytes: mov byte [rax],1 ... jb rel8 back to the mov.
        let loop_start = c.len() - 14;
        assert_eq!(&c[loop_start..loop_start + 3], &[0xc6, 0x00, 0x01]);
        assert_eq!(c[c.len() - 2], 0x72);
        assert_eq!(c[c.len() - 1] as i8, -14);
        // The end address is the memory size.
        let end = u64::from_le_bytes(c[loop_start - 8..loop_start].try_into().unwrap());
        assert_eq!(end, 256 << 20);
    }
}
