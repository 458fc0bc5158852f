//! Giving guest pages back to the host. Which call depends on what backs the region, and is
//! decided by the kernel's view of the mapping, not by how the region was first mapped (a
//! `--mem-dir` VM's RAM is remapped private over its snapshot file after the first snapshot):
//!
//! - anonymous memory (a booted VM): `MADV_DONTNEED`; the page reads as zero afterwards and is
//!   not resident, so snapshots leave it out.
//! - a shared file mapping (`--mem-dir` before its first snapshot): `MADV_REMOVE` punches the
//!   range out of the file (as `fallocate(PUNCH_HOLE)` would, and without the file descriptor).
//! - a private file mapping (a VM restored from `memory.bin`): `MADV_REMOVE` is refused there
//!   (EACCES), so `MADV_DONTNEED` drops the private copies; the page then reads the snapshot
//!   file's contents again, which is fine for a page the guest freed.
//! - anonymous memory under `userfaultfd` (a lazy restore still streaming): `MADV_DONTNEED`;
//!   the lazy loader serves a page faulted again after its chunk was installed with the zero
//!   page, and one not installed yet with the snapshot's page.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::queues::PageRange;
use crate::GuestMemory;

/// Releases the host memory behind `range` (already checked to be inside guest memory).
/// Returns the bytes released.
pub fn discard(mem: &GuestMemory, range: PageRange) -> std::io::Result<u64> {
    let mut done = 0u64;
    while done < range.len {
        let gpa = GuestAddress(range.gpa + done);
        let Some(region) = mem.find_region(gpa) else {
            return Err(std::io::ErrorKind::InvalidInput.into());
        };
        let offset = gpa.0 - region.start_addr().0;
        let len = (region.len() - offset).min(range.len - done);
        let host = region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let file_backed = region.file_offset().is_some();
        release(host, len, file_backed)?;
        done += len;
    }
    Ok(done)
}

fn release(host: *mut u8, len: u64, file_backed: bool) -> std::io::Result<()> {
    let len = usize::try_from(len).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    if file_backed {
        // SAFETY: `host..host+len` lies inside one guest memory region mapped by this process
        // for the VM's life; MADV_REMOVE only frees the backing store of a shared mapping (the
        // guest sees zeros there next), it never unmaps, so no Rust reference is invalidated.
        let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_REMOVE) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        // A private mapping (or a file system without hole punching): drop our copies instead.
        if !matches!(
            err.raw_os_error(),
            Some(libc::EACCES | libc::EINVAL | libc::EOPNOTSUPP)
        ) {
            return Err(err);
        }
    }
    // SAFETY: as above; MADV_DONTNEED on guest RAM drops the pages (anonymous: zero on next
    // touch; private file mapping: the file's page on next touch). Guest memory is only ever
    // accessed through volatile copies, never through references that could observe this.
    let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
