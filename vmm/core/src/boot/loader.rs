//! Loading the kernel image (ELF vmlinux or bzImage) and the initrd into guest memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::layout::HIMEM_START;
use super::BootError;
use devices::GuestMemory;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: u64,
    pub kernel_end: u64,
    pub setup_header: Option<setup_header>,
    /// Virtual address of the first loadable ELF segment (tells a PVM-aware kernel apart).
    pub elf_link_vaddr: Option<u64>,
}

/// Offset of the 64-bit entry point in a bzImage's protected-mode code (boot protocol 2.12+).
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Recognises the image format from its magic numbers.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        return Some(KernelFormat::Elf);
    }
    if head.get(0x202..0x206) == Some(b"HdrS".as_slice()) {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// The p_vaddr of the first PT_LOAD segment of a 64-bit ELF, if the header is sane.
pub fn elf_first_load_vaddr(head: &[u8]) -> Option<u64> {
    let bytes = |o: usize, n: usize| head.get(o..o.checked_add(n)?);
    let u16_at = |o| {
        bytes(o, 2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_le_bytes)
    };
    let u32_at = |o| {
        bytes(o, 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o| {
        bytes(o, 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    (0..phnum).find_map(|i| {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        (u32_at(ph)? == 1)
            .then(|| u64_at(ph.checked_add(0x10)?))
            .flatten()
    })
}

pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let io = |e| BootError::KernelIo(path.to_path_buf(), e);
    let mut file = File::open(path).map_err(io)?;
    let mut head = vec![0u8; 4096];
    let n = read_up_to(&mut file, &mut head).map_err(io)?;
    head.truncate(n);
    let format =
        detect_format(&head).ok_or_else(|| BootError::UnknownKernelFormat(path.to_path_buf()))?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let bad = |e| BootError::KernelLoad(path.to_path_buf(), e);
    Ok(match format {
        KernelFormat::Elf => {
            let r =
                Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(bad)?;
            LoadedKernel {
                format,
                entry: r.kernel_load.0,
                kernel_end: r.kernel_end,
                setup_header: None,
                elf_link_vaddr: elf_first_load_vaddr(&head),
            }
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(bad)?;
            LoadedKernel {
                format,
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                kernel_end: r.kernel_end,
                setup_header: r.setup_header,
                elf_link_vaddr: None,
            }
        }
    })
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Reads the whole initrd into guest memory at `addr`.
pub fn load_initrd(mem: &GuestMemory, path: &Path, addr: u64, size: u64) -> Result<(), BootError> {
    let io = |e| BootError::InitrdIo(path.to_path_buf(), e);
    let mut file = File::open(path).map_err(io)?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge(size))?;
    let slice = mem
        .get_slice(GuestAddress(addr), len)
        .map_err(|_| BootError::InitrdTooLarge(size))?;
    let mut done = 0usize;
    while done < len {
        let mut sub = slice
            .subslice(done, len - done)
            .map_err(|_| BootError::InitrdTooLarge(size))?;
        match file.read_volatile(&mut sub) {
            Ok(0) => return Err(io(std::io::Error::from(std::io::ErrorKind::UnexpectedEof))),
            Ok(n) => done += n,
            Err(e) => return Err(BootError::InitrdRead(path.to_path_buf(), e.to_string())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_magic() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"garbage"), None);
        assert_eq!(detect_format(&[]), None);
    }

    #[test]
    fn elf_vaddr_parsing_is_bounds_checked() {
        assert_eq!(elf_first_load_vaddr(&[]), None);
        let mut h = vec![0u8; 0x200];
        h[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        h[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        h[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        h[0x40..0x44].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        h[0x78..0x7c].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        h[0x88..0x90].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        assert_eq!(elf_first_load_vaddr(&h), Some(0xffff_ffff_8100_0000));
        h[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(elf_first_load_vaddr(&h), None);
    }
}
