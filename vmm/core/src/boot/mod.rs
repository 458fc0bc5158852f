//! x86_64 direct boot: put the kernel, initrd, command line, zero page, page tables, GDT and MP
//! table into guest memory, and compute each vCPU's initial registers.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod paging;
pub mod params;
pub mod regs;

use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::boot_params;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use devices::GuestMemory;
use layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, GDT_ADDR, IDT_ADDR, MPTABLE_ADDR, ZERO_PAGE_ADDR};
pub use loader::{KernelFormat, LoadedKernel};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel {0}: {1}")]
    KernelIo(PathBuf, std::io::Error),
    #[error("{0} is neither a vmlinux ELF nor a bzImage (no ELF magic, no \"HdrS\" boot header)")]
    UnknownKernelFormat(PathBuf),
    #[error("cannot load kernel {0}: {1}")]
    KernelLoad(PathBuf, linux_loader::loader::Error),
    #[error("cannot read initrd {0}: {1}")]
    InitrdIo(PathBuf, std::io::Error),
    #[error("cannot read initrd {0}: {1}")]
    InitrdRead(PathBuf, String),
    #[error("initrd of {0} bytes does not fit in guest memory above the kernel")]
    InitrdTooLarge(u64),
    #[error("kernel command line is {0} bytes; the limit is {CMDLINE_MAX_SIZE} including the NUL")]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error("writing boot structures to guest memory failed at {0:#x}")]
    GuestWrite(u64),
}

pub struct BootSetup<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub vcpus: u8,
    pub mem_size: u64,
}

/// Writes everything the kernel expects to find in memory; returns the loaded kernel's facts.
pub fn setup_memory(mem: &GuestMemory, setup: &BootSetup) -> Result<LoadedKernel, BootError> {
    let kernel = loader::load_kernel(mem, setup.kernel)?;

    let initrd = match setup.initrd {
        Some(path) => {
            let size = std::fs::metadata(path)
                .map_err(|e| BootError::InitrdIo(path.to_path_buf(), e))?
                .len();
            let addr_max = kernel
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|m| *m != 0)
                .unwrap_or(0x7fff_ffff);
            let addr = params::initrd_address(setup.mem_size, kernel.kernel_end, size, addr_max)
                .ok_or(BootError::InitrdTooLarge(size))?;
            loader::load_initrd(mem, path, addr, size)?;
            let size32 = u32::try_from(size).map_err(|_| BootError::InitrdTooLarge(size))?;
            Some((addr, size32))
        }
        None => None,
    };

    if setup.cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut cmdline = setup.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    if cmdline.len() > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    write(mem, CMDLINE_ADDR, &cmdline)?;

    let zero_page: boot_params = params::build_zero_page(&params::ZeroPageInput {
        setup_header: kernel.setup_header,
        cmdline_size: cmdline.len() as u32,
        initrd,
        mem_size: setup.mem_size,
    });
    write(mem, ZERO_PAGE_ADDR, zero_page.as_slice())?;

    let gdt: Vec<u8> = gdt::boot_gdt()
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    write(mem, GDT_ADDR, &gdt)?;
    write(mem, IDT_ADDR, &0u64.to_le_bytes())?;
    for (addr, value) in paging::identity_map_entries() {
        write(mem, addr, &value.to_le_bytes())?;
    }
    write(
        mem,
        MPTABLE_ADDR,
        &mptable::build(MPTABLE_ADDR, setup.vcpus)?,
    )?;
    Ok(kernel)
}

fn write(mem: &GuestMemory, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|_| BootError::GuestWrite(addr))
}
