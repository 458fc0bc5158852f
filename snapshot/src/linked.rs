//! Snapshots of guest memory that already lives in a file (`dormouse run --mem-dir`): the file
//! becomes the snapshot's `memory.bin` by a hard link, so a full snapshot costs the same for
//! 40 MiB or 2 GiB of touched memory. Afterwards the guest must stop writing to that file:
//! [`remap_private`] turns its memory into copy-on-write over the (now frozen) file, exactly
//! what a restore with `RestoreStrategy::Private` would have built.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{io_err, Result, SnapshotError};
use crate::fsutil;
use crate::layout::{MemoryRegion, PAGE_SIZE};
use crate::manifest::{Manifest, SnapshotMeta};
use crate::page_bitmap::PageBitmap;
use crate::restore::{map_fixed, GuestMemory};
use crate::source::MemorySource;
use crate::staging::StagingDir;
use crate::writer::{
    finish_snapshot, memory_path, write_memory_file, Finish, PageSelection, WriteOptions,
};

/// How a snapshot's `memory.bin` was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryStorage {
    /// The guest's own memory file got a second name: nothing was copied.
    Linked,
    /// The selected pages were copied into a new file.
    Written,
}

impl MemoryStorage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Linked => "linked",
            Self::Written => "written",
        }
    }
}

impl std::fmt::Display for MemoryStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot taken by [`write_snapshot_from_file`].
#[derive(Clone, Debug)]
pub struct FileSnapshot {
    pub manifest: Manifest,
    pub memory: MemoryStorage,
}

/// Whether `link_open_file` failed because this file cannot be linked there (another file
/// system or mount, or no hard links), as opposed to a fault the copy would hit as well.
fn link_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EXDEV | libc::EPERM | libc::EOPNOTSUPP | libc::EMLINK | libc::ENOSYS)
    )
}

/// Gives the open `file` (typically an unnamed `O_TMPFILE`) the new name `dest`.
///
/// Through `/proc/self/fd/N` with `AT_SYMLINK_FOLLOW`, which needs no capability; `AT_EMPTY_PATH`
/// (needs `CAP_DAC_READ_SEARCH`) only when `/proc` is not mounted.
pub fn link_open_file(file: &File, dest: &Path) -> io::Result<()> {
    let c_dest = CString::new(dest.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let proc_path = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    let linked = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path.as_ptr(),
            libc::AT_FDCWD,
            c_dest.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if linked == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOENT) || Path::new("/proc/self/fd").exists() {
        return Err(err);
    }
    // SAFETY: `c""` is a valid empty string; the descriptor is open for the whole call.
    let linked = unsafe {
        libc::linkat(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c_dest.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if linked == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Pages of `file` that hold data (not holes), in file page numbering: `SEEK_DATA`/`SEEK_HOLE`,
/// so O(extents), not O(size). A page partly covered by an extent counts.
pub fn allocated_pages(file: &File, path: &Path, len: u64) -> Result<PageBitmap> {
    let mut pages = PageBitmap::new(len.div_ceil(PAGE_SIZE));
    for (start, end) in fsutil::data_extents(file, path, 0, len)? {
        let first = start / PAGE_SIZE;
        let last = end.div_ceil(PAGE_SIZE);
        pages.set_range(first, last.saturating_sub(first));
    }
    Ok(pages)
}

/// Splits a whole-file page bitmap into one bitmap per region (region page numbering).
fn per_region(pages: &PageBitmap, layout: &[MemoryRegion]) -> Vec<PageBitmap> {
    let mut bitmaps: Vec<PageBitmap> = layout
        .iter()
        .map(|r| PageBitmap::new(r.page_count()))
        .collect();
    for (start, count) in pages.runs() {
        let end = start.saturating_add(count);
        for (region, bitmap) in layout.iter().zip(bitmaps.iter_mut()) {
            let first = region.first_page();
            let last = first.saturating_add(region.page_count());
            let (from, to) = (start.max(first), end.min(last));
            if from < to {
                bitmap.set_range(from - first, to - from);
            }
        }
    }
    bitmaps
}

/// Takes a full snapshot of guest memory that is a `MAP_SHARED` mapping of `backing`, laid out
/// like `memory.bin` (region `i` at `layout[i].file_offset`, file length = guest RAM size).
///
/// When `dir` is on the same mount as `backing`, `backing` is hard-linked as `memory.bin` and
/// [`MemoryStorage::Linked`] returned: from then on the file is the snapshot's, and the caller
/// must make sure the guest never writes to it again ([`remap_private`]) before it resumes.
/// Otherwise (another file system, no hard links) the file's data pages are copied like
/// [`crate::write_snapshot`] does and [`MemoryStorage::Written`] returned. The guest must be
/// paused for the whole call.
pub fn write_snapshot_from_file<T: Serialize>(
    dir: &Path,
    state: &T,
    memory: &MemorySource<'_>,
    backing: &File,
    meta: &SnapshotMeta,
    options: &WriteOptions<'_>,
) -> Result<FileSnapshot> {
    if options.parent.is_some() {
        return Err(SnapshotError::InvalidRequest(
            "a diff snapshot cannot link the memory file; it writes dirty pages".into(),
        ));
    }
    let layout = memory.layout();
    let total = layout
        .last()
        .map(|r| r.file_offset.saturating_add(r.size))
        .unwrap_or(0);
    let backing_path = Path::new("guest memory file");
    let len = backing
        .metadata()
        .map_err(io_err("stat", backing_path))?
        .len();
    if len != total {
        return Err(SnapshotError::InvalidRequest(format!(
            "the guest memory file holds {len} bytes, guest RAM is {total}"
        )));
    }
    let pages = allocated_pages(backing, backing_path, len)?;

    let staging = StagingDir::create(dir, options.policy())?;
    let target = memory_path(staging.path());
    // The link shares the guest's inode, so its mode is the snapshot file's mode: 0600 whatever
    // mode the memory file was created with.
    backing
        .set_permissions(std::fs::Permissions::from_mode(fsutil::FILE_MODE))
        .map_err(io_err("set mode 0600 on", backing_path))?;
    let storage = match link_open_file(backing, &target) {
        Ok(()) => MemoryStorage::Linked,
        Err(e) if link_unsupported(&e) => {
            tracing::debug!(
                dir = %dir.display(),
                error = %e,
                "cannot link the guest memory file there: copying its pages"
            );
            let bitmaps = per_region(&pages, layout);
            write_memory_file(
                &target,
                memory,
                PageSelection::Dirty(&bitmaps),
                options.sync,
            )?;
            MemoryStorage::Written
        }
        Err(e) => return Err(io_err("link guest memory file as", &target)(e)),
    };
    if storage == MemoryStorage::Linked && options.sync {
        backing.sync_all().map_err(io_err("fsync", &target))?;
    }
    let manifest = finish_snapshot(
        staging,
        dir,
        state,
        &Finish {
            layout,
            written: &pages,
            dirty_info: false,
            parent: None,
            meta,
            options,
        },
    )?;
    tracing::debug!(
        dir = %dir.display(),
        id = %manifest.snapshot_id,
        memory = %storage,
        pages = manifest.pages.written,
        "snapshot of file-backed memory"
    );
    Ok(FileSnapshot {
        manifest,
        memory: storage,
    })
}

/// Replaces every region of `memory` (a mapping of `file` at the region's offset in it) with a
/// private, copy-on-write mapping of the same file range at the same address: the contents stay
/// the same, later writes stay in this process and never reach `file`. KVM follows the change
/// through its MMU notifiers. Call it with the guest paused (the replacement is atomic, but a
/// write racing with it could land in the old shared mapping).
pub fn remap_private(memory: &GuestMemory, file: &File) -> Result<()> {
    for region in memory.iter() {
        let offset = region.file_offset().map(|f| f.start()).ok_or_else(|| {
            SnapshotError::GuestMemory(format!(
                "region at {:#x} is not backed by a file",
                region.start_addr().0
            ))
        })?;
        map_fixed(region.as_ptr(), region.len() as usize, file, offset).map_err(io_err(
            "map privately (copy-on-write) the guest memory file",
            Path::new("memory.bin"),
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{
        Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
    };

    fn tmpfile_in(dir: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
            .unwrap()
    }

    use std::os::unix::fs::OpenOptionsExt;

    /// Guest memory of two regions mapped shared from one file, like `--mem-dir` builds it.
    fn shared_memory(file: &Arc<File>, sizes: &[(u64, usize)]) -> GuestMemory {
        let mut offset = 0u64;
        let regions = sizes
            .iter()
            .map(|&(guest, size)| {
                let mapping: MmapRegion<AtomicBitmap> =
                    MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
                        .with_file_offset(FileOffset::from_arc(Arc::clone(file), offset))
                        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                        .build()
                        .unwrap();
                offset += size as u64;
                GuestRegionMmap::new(mapping, GuestAddress(guest)).unwrap()
            })
            .collect();
        GuestMemoryMmap::from_regions(regions).unwrap()
    }

    #[test]
    fn allocated_pages_are_the_written_ones() {
        let dir = tempfile::tempdir().unwrap();
        let file = tmpfile_in(dir.path());
        file.set_len(256 * PAGE_SIZE).unwrap();
        file.write_all_at(&[1u8; 10], 3 * PAGE_SIZE + 100).unwrap();
        file.write_all_at(&[2u8; 4096 * 2], 200 * PAGE_SIZE)
            .unwrap();
        let pages = allocated_pages(&file, dir.path(), 256 * PAGE_SIZE).unwrap();
        assert_eq!(pages.page_count(), 256);
        // File systems may allocate in larger blocks, never less than what was written.
        assert!(pages.get(3) && pages.get(200) && pages.get(201));
        assert!(pages.count_ones() <= 3 * 16, "{} pages", pages.count_ones());
        assert!(!pages.get(100));
        let empty = tmpfile_in(dir.path());
        empty.set_len(1 << 30).unwrap();
        assert!(allocated_pages(&empty, dir.path(), 1 << 30)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn whole_file_pages_split_by_region() {
        let layout =
            crate::layout::compute_layout(&[(0, 4 * PAGE_SIZE), (1 << 32, 4 * PAGE_SIZE)]).unwrap();
        let mut pages = PageBitmap::new(8);
        pages.set_range(2, 4); // pages 2..6: last two of region 0, first two of region 1
        let split = per_region(&pages, &layout);
        assert_eq!(split[0].runs().collect::<Vec<_>>(), vec![(2, 2)]);
        assert_eq!(split[1].runs().collect::<Vec<_>>(), vec![(0, 2)]);
    }

    #[test]
    fn unsupported_link_errors_fall_back_and_others_do_not() {
        for errno in [libc::EXDEV, libc::EPERM, libc::EOPNOTSUPP] {
            assert!(link_unsupported(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::EACCES, libc::ENOSPC, libc::EEXIST] {
            assert!(!link_unsupported(&io::Error::from_raw_os_error(errno)));
        }
    }

    #[test]
    fn an_unnamed_file_gets_a_name_with_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let file = tmpfile_in(dir.path());
        file.write_all_at(b"hello", 0).unwrap();
        let dest = dir.path().join("linked.bin");
        link_open_file(&file, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        // A second name for the same inode is refused only if the name exists.
        let again = link_open_file(&file, &dest).unwrap_err();
        assert_eq!(again.raw_os_error(), Some(libc::EEXIST));
    }

    #[test]
    fn remap_keeps_contents_and_makes_later_writes_private() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(tmpfile_in(dir.path()));
        let sizes = [
            (0u64, 16 * PAGE_SIZE as usize),
            (1 << 20, 8 * PAGE_SIZE as usize),
        ];
        file.set_len(24 * PAGE_SIZE).unwrap();
        let memory = shared_memory(&file, &sizes);
        memory
            .write_obj(0x1122_3344u32, GuestAddress(5 * PAGE_SIZE))
            .unwrap();
        memory
            .write_obj(0x5566u16, GuestAddress((1 << 20) + 7))
            .unwrap();
        // Shared: the file sees the guest's writes.
        let mut word = [0u8; 4];
        file.read_exact_at(&mut word, 5 * PAGE_SIZE).unwrap();
        assert_eq!(u32::from_ne_bytes(word), 0x1122_3344);

        remap_private(&memory, &file).unwrap();
        let host_before = memory.get_host_address(GuestAddress(0)).unwrap();
        assert_eq!(
            memory.read_obj::<u32>(GuestAddress(5 * PAGE_SIZE)).unwrap(),
            0x1122_3344
        );
        assert_eq!(
            memory.read_obj::<u16>(GuestAddress((1 << 20) + 7)).unwrap(),
            0x5566
        );
        memory
            .write_obj(0xdead_beefu32, GuestAddress(5 * PAGE_SIZE))
            .unwrap();
        memory
            .write_obj(0x7777u16, GuestAddress((1 << 20) + 7))
            .unwrap();
        memory.write_obj(9u8, GuestAddress(12 * PAGE_SIZE)).unwrap();
        assert_eq!(
            memory.read_obj::<u32>(GuestAddress(5 * PAGE_SIZE)).unwrap(),
            0xdead_beef
        );
        // The file is frozen at the remap: old contents, holes stay holes.
        file.read_exact_at(&mut word, 5 * PAGE_SIZE).unwrap();
        assert_eq!(u32::from_ne_bytes(word), 0x1122_3344);
        let mut half = [0u8; 2];
        file.read_exact_at(&mut half, 16 * PAGE_SIZE + 7).unwrap();
        assert_eq!(u16::from_ne_bytes(half), 0x5566);
        let pages = allocated_pages(&file, dir.path(), 24 * PAGE_SIZE).unwrap();
        assert!(!pages.get(12));
        // Same host addresses: KVM's memory slots stay valid.
        assert_eq!(
            memory.get_host_address(GuestAddress(0)).unwrap(),
            host_before
        );
    }

    #[test]
    fn remap_refuses_anonymous_memory() {
        let dir = tempfile::tempdir().unwrap();
        let file = tmpfile_in(dir.path());
        let memory: GuestMemory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), PAGE_SIZE as usize)]).unwrap();
        assert!(matches!(
            remap_private(&memory, &file),
            Err(SnapshotError::GuestMemory(_))
        ));
    }
}
