//! A tiny test guest the project builds itself: an ELF64 image of a few bytes of 64-bit code that
//! writes a line to the serial port and then resets through the i8042 (or idles). It measures the
//! VMM's own start and exit cost, with no guest kernel in the way.

/// Physical load address (the ELF loader wants segments at or above 1 MiB).
const LOAD_ADDR: u64 = 0x10_0000;
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;

/// What the guest does after printing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyGuestEnd {
    /// `out 0x64, 0xfe`: the VMM exits with status 0.
    Reset,
    /// `cli; hlt` forever: the VM idles (for RSS measurements).
    Idle,
}

/// The message the tiny guest prints.
pub const TINY_GUEST_MESSAGE: &[u8] = b"dormouse-tiny-guest\n";

fn code(end: TinyGuestEnd) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &b in TINY_GUEST_MESSAGE {
        c.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    match end {
        TinyGuestEnd::Reset => c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]), // out 0x64, 0xfe
        TinyGuestEnd::Idle => c.push(0xfa),                                    // cli
    }
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp back to hlt
    c
}

/// The whole ELF file.
pub fn elf_image(end: TinyGuestEnd) -> Vec<u8> {
    let code = code(end);
    let code_off = (EHDR_LEN + PHDR_LEN) as u64;
    let file_len = code_off + code.len() as u64;
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
}
