//! Guest RAM: lazily populated mappings (MAP_NORESERVE), with a per-page bitmap of writes the
//! VMM itself makes (KVM's dirty log only sees the guest's). Anonymous by default; with a memory
//! directory, `MAP_SHARED` mappings of one unnamed (`O_TMPFILE`) sparse file there, laid out
//! like a snapshot's `memory.bin`, so a full snapshot can link the file instead of copying it.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

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
    #[error("memory directory {0} does not exist")]
    MemDirMissing(PathBuf),
    #[error("memory directory {0} is not a directory")]
    MemDirNotDir(PathBuf),
    #[error(
        "memory directory {dir}: its file system ({fs}) cannot create unnamed files (O_TMPFILE); \
         use a directory on ext4, xfs, btrfs or tmpfs"
    )]
    NoTmpfile { dir: PathBuf, fs: String },
    #[error("memory directory {dir}: cannot create the guest memory file: {source}")]
    MemFile {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("memory directory {dir}: cannot size the guest memory file to {size} bytes: {source}")]
    MemFileSize {
        dir: PathBuf,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map the guest memory file: {0}")]
    MapFile(String),
}

pub const MIN_MEM_MIB: u64 = 8;

/// Anonymous guest RAM of `mem_mib` MiB.
pub fn create_guest_memory(mem_mib: u64) -> Result<GuestMemory, MemoryError> {
    create_guest_memory_in(mem_mib, None)
}

/// Guest RAM of `mem_mib` MiB: anonymous, or with `mem_dir` a shared mapping of an unnamed file
/// there (it vanishes with the process unless a snapshot links it).
pub fn create_guest_memory_in(
    mem_mib: u64,
    mem_dir: Option<&Path>,
) -> Result<GuestMemory, MemoryError> {
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
    let Some(dir) = mem_dir else {
        tracing::info!("guest RAM: {mem_mib} MiB anonymous memory");
        return GuestMemory::from_ranges(&ranges).map_err(MemoryError::Map);
    };
    let file = Arc::new(create_memory_file(dir, size)?);
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        let mapping = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(FileOffset::from_arc(Arc::clone(&file), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::MapFile(format!("region at {:#x}: {e}", start.0)))?;
        regions.push(
            GuestRegionMmap::new(mapping, start).ok_or_else(|| {
                MemoryError::MapFile(format!("region at {:#x} overflows", start.0))
            })?,
        );
        offset = offset.saturating_add(len as u64);
    }
    tracing::info!(
        "guest RAM: {mem_mib} MiB shared mapping of an unnamed file in {}",
        dir.display()
    );
    GuestMemory::from_regions(regions).map_err(|e| MemoryError::MapFile(e.to_string()))
}

/// An unnamed file of `size` bytes (all holes) in `dir`.
fn create_memory_file(dir: &Path, size: u64) -> Result<File, MemoryError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ENOENT) => MemoryError::MemDirMissing(dir.to_path_buf()),
            Some(libc::ENOTDIR) => MemoryError::MemDirNotDir(dir.to_path_buf()),
            // Kernels or file systems without O_TMPFILE: EOPNOTSUPP, or EISDIR from kernels
            // that read the flag as a plain open of the directory.
            Some(libc::EOPNOTSUPP | libc::EISDIR) => MemoryError::NoTmpfile {
                dir: dir.to_path_buf(),
                fs: fs_name(dir),
            },
            _ => MemoryError::MemFile {
                dir: dir.to_path_buf(),
                source,
            },
        })?;
    file.set_len(size)
        .map_err(|source| MemoryError::MemFileSize {
            dir: dir.to_path_buf(),
            size,
            source,
        })?;
    Ok(file)
}

/// A name for the file system `path` is on, for error messages.
fn fs_name(path: &Path) -> String {
    let Ok(c_path) =
        std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
    else {
        return "unknown".into();
    };
    // SAFETY: statfs only writes into the zeroed struct we own; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return "unknown".into();
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between C libraries
    let magic = stat.f_type as i64;
    let name = match magic {
        0xef53 => "ext2/3/4",
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0x0102_1994 => "tmpfs",
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        0x794c_7630 => "overlayfs",
        0x4d44 => "vfat",
        0x0102_1997 => "9p",
        0x5346_544e => "ntfs",
        _ => return format!("type {magic:#x}"),
    };
    name.to_string()
}

/// The file guest RAM is a shared mapping of, when it is laid out like a snapshot's memory file
/// (every region `MAP_SHARED` from the same file, back to back from offset 0).
pub fn shared_memory_file(memory: &GuestMemory) -> Option<Arc<File>> {
    let mut file: Option<&Arc<File>> = None;
    let mut expected_offset = 0u64;
    for region in memory.iter() {
        let backing = region.file_offset()?;
        if region.flags() & libc::MAP_SHARED == 0 || backing.start() != expected_offset {
            return None;
        }
        match file {
            Some(f) if !Arc::ptr_eq(f, backing.arc()) => return None,
            _ => file = Some(backing.arc()),
        }
        expected_offset = expected_offset.checked_add(region.len())?;
    }
    file.cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

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

    #[test]
    fn file_backed_memory_is_shared_with_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = create_guest_memory_in(64, Some(dir.path())).unwrap();
        let file = shared_memory_file(&m).expect("file-backed");
        assert_eq!(file.metadata().unwrap().len(), 64 << 20);
        // Unnamed: nothing appears in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        m.write_obj(0xabcdu16, GuestAddress(0x12_3456)).unwrap();
        let mut bytes = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut bytes, 0x12_3456).unwrap();
        assert_eq!(u16::from_ne_bytes(bytes), 0xabcd);
        assert!(shared_memory_file(&create_guest_memory(64).unwrap()).is_none());
    }

    #[test]
    fn bad_memory_directories_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            create_guest_memory_in(64, Some(&missing)),
            Err(MemoryError::MemDirMissing(p)) if p == missing
        ));
        let plain = dir.path().join("file");
        std::fs::write(&plain, b"x").unwrap();
        assert!(matches!(
            create_guest_memory_in(64, Some(&plain)),
            Err(MemoryError::MemDirNotDir(p)) if p == plain
        ));
        // /proc has no O_TMPFILE.
        let err = create_guest_memory_in(64, Some(Path::new("/proc"))).unwrap_err();
        assert!(
            matches!(
                err,
                MemoryError::NoTmpfile { .. } | MemoryError::MemFile { .. }
            ),
            "{err}"
        );
        assert_eq!(fs_name(Path::new("/proc")), "type 0x9fa0");
    }
}
