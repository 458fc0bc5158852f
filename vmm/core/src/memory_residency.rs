//! Which pages of anonymous guest RAM hold data, for a full snapshot of a booted VM.
//!
//! Guest RAM is a lazily populated anonymous mapping, so a page nobody (guest or VMM) ever
//! touched has no backing and reads as zeros: a full snapshot writes only the other pages.
//!
//! - `mincore` is the fast way (one byte per page, one call per region), but it reports a page
//!   the host swapped out (to a disk, zram, or through zswap) as not resident although it holds
//!   guest data: on a host with swap a full snapshot would silently lose that data.
//! - `/proc/self/pagemap` (eight bytes per page) tells "present" and "swapped" apart from "never
//!   touched", so it is used whenever the host has swap configured.
//!
//! Swap is detected with `sysinfo(2)`'s `totalswap` rather than by parsing `/proc/swaps`: one
//! syscall, no text format, and it counts every active swap area (zram included; zswap only
//! caches in front of one, so it is covered too). It is checked at every snapshot, so a
//! `swapon` after the VM started is seen. If the chosen method fails, every page is kept: a
//! larger snapshot, never a wrong one.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use snapshot::{PageBitmap, PAGE_SIZE};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use devices::GuestMemory;

/// Bit 63 of a pagemap entry: the page is in RAM.
const PAGEMAP_PRESENT: u64 = 1 << 63;
/// Bit 62 of a pagemap entry: the page is in swap.
const PAGEMAP_SWAPPED: u64 = 1 << 62;
const PAGEMAP_ENTRY_BYTES: usize = 8;
/// Pagemap entries read per `pread`: 256 KiB of entries, i.e. 128 MiB of guest RAM per call.
const PAGEMAP_CHUNK_ENTRIES: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ResidencyError {
    #[error("mincore on guest memory at {addr:#x} ({len} bytes): {source}")]
    Mincore {
        addr: usize,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot open /proc/self/pagemap: {0}")]
    OpenPagemap(#[source] io::Error),
    #[error("reading /proc/self/pagemap at offset {offset}: {source}")]
    ReadPagemap {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("guest memory region at {addr:#x} ({len} bytes) is outside the address space")]
    BadRange { addr: usize, len: usize },
}

/// How to find the pages that hold data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Resident pages only: exact when the host has no swap.
    Mincore,
    /// Present or swapped-out pages.
    Pagemap,
}

impl Method {
    /// Pagemap when the host has swap (mincore would miss swapped-out pages), else mincore.
    pub fn for_this_host() -> Self {
        if host_has_swap() {
            Method::Pagemap
        } else {
            Method::Mincore
        }
    }
}

/// True when the host has at least one active swap area.
pub fn host_has_swap() -> bool {
    // SAFETY: `sysinfo` is plain data; all zeros is a valid value.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: sysinfo(2) only writes the struct we pass.
    let ok = unsafe { libc::sysinfo(&mut info) } == 0;
    // If the call fails, assume swap: the pagemap path is correct either way, just slower.
    !ok || info.totalswap > 0
}

/// Pages of anonymous guest memory that hold data, one bitmap per region. A region whose pages
/// cannot be read is kept whole.
pub fn pages_with_data(mem: &GuestMemory) -> Vec<PageBitmap> {
    let method = Method::for_this_host();
    tracing::debug!(?method, "selecting guest pages for a full snapshot");
    mem.iter()
        .map(|region| {
            let len = region.len() as usize;
            let pages = (len as u64).div_ceil(PAGE_SIZE);
            let selected = match mem.get_host_address(region.start_addr()) {
                Ok(addr) => region_pages(addr as usize, len, method),
                Err(e) => {
                    tracing::warn!(error = %e, "guest region without a host address");
                    return PageBitmap::full(pages);
                }
            };
            selected.unwrap_or_else(|e| {
                // Cannot tell: keep every page (correct, just larger).
                tracing::warn!(error = %e, "keeping every page of a guest memory region");
                PageBitmap::full(pages)
            })
        })
        .collect()
}

/// Pages of each guest memory region that hold data as `method` reads them, one bitmap per
/// region; an error if any region cannot be read (for callers that need an exact answer).
pub fn regions_pages(mem: &GuestMemory, method: Method) -> Result<Vec<PageBitmap>, ResidencyError> {
    mem.iter()
        .map(|region| region_pages(region.as_ptr() as usize, region.len() as usize, method))
        .collect()
}

/// Pages of the mapping `addr..addr + len` (page-aligned `addr`) that hold data.
pub fn region_pages(addr: usize, len: usize, method: Method) -> Result<PageBitmap, ResidencyError> {
    match method {
        Method::Mincore => mincore_pages(addr, len),
        Method::Pagemap => pagemap_pages(addr, len),
    }
}

fn page_count(len: usize) -> usize {
    len.div_ceil(PAGE_SIZE as usize)
}

fn mincore_pages(addr: usize, len: usize) -> Result<PageBitmap, ResidencyError> {
    let mut vec = vec![0u8; page_count(len)];
    // SAFETY: mincore only writes one byte per page of `addr..addr + len` into `vec`, which has
    // exactly that many bytes; an address range that is not mapped is an error, not UB.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(ResidencyError::Mincore {
            addr,
            len,
            source: io::Error::last_os_error(),
        });
    }
    let mut bitmap = PageBitmap::new(vec.len() as u64);
    for (page, v) in vec.iter().enumerate() {
        if v & 1 == 1 {
            bitmap.set(page as u64);
        }
    }
    Ok(bitmap)
}

fn pagemap_pages(addr: usize, len: usize) -> Result<PageBitmap, ResidencyError> {
    let pages = page_count(len);
    let pagemap = File::open("/proc/self/pagemap").map_err(ResidencyError::OpenPagemap)?;
    let first_entry = (addr as u64) / PAGE_SIZE;
    let mut bitmap = PageBitmap::new(pages as u64);
    let mut buf = vec![0u8; PAGEMAP_CHUNK_ENTRIES.min(pages) * PAGEMAP_ENTRY_BYTES];
    let mut done = 0usize;
    while done < pages {
        let entries = PAGEMAP_CHUNK_ENTRIES.min(pages - done);
        let chunk = buf
            .get_mut(..entries * PAGEMAP_ENTRY_BYTES)
            .ok_or(ResidencyError::BadRange { addr, len })?;
        let offset = first_entry
            .checked_add(done as u64)
            .and_then(|e| e.checked_mul(PAGEMAP_ENTRY_BYTES as u64))
            .ok_or(ResidencyError::BadRange { addr, len })?;
        pagemap
            .read_exact_at(chunk, offset)
            .map_err(|source| ResidencyError::ReadPagemap { offset, source })?;
        mark_pages_with_data(chunk, done as u64, &mut bitmap);
        done += entries;
    }
    Ok(bitmap)
}

/// True when a pagemap entry describes a page that holds data (in RAM or in swap).
pub fn pagemap_entry_has_data(entry: u64) -> bool {
    entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0
}

/// Sets in `bitmap` the pages with data among raw pagemap `entries` (native-endian u64s) that
/// describe pages `first_page..`. Entries past the bitmap's end are ignored.
fn mark_pages_with_data(entries: &[u8], first_page: u64, bitmap: &mut PageBitmap) {
    for (i, raw) in entries.chunks_exact(PAGEMAP_ENTRY_BYTES).enumerate() {
        let mut bytes = [0u8; PAGEMAP_ENTRY_BYTES];
        bytes.copy_from_slice(raw);
        let page = first_page + i as u64;
        if page < bitmap.page_count() && pagemap_entry_has_data(u64::from_ne_bytes(bytes)) {
            bitmap.set(page);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small private anonymous mapping, unmapped on drop. Small (far below 2 MiB) and marked
    /// no-huge-page so a touch never brings in neighbours through a transparent huge page.
    struct Anon {
        addr: usize,
        len: usize,
    }

    impl Anon {
        fn new(pages: usize) -> Self {
            let len = pages * PAGE_SIZE as usize;
            // SAFETY: a fresh anonymous mapping; no existing memory is affected.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED, "mmap");
            // SAFETY: advice on the mapping just created. Best effort: THP may be off anyway.
            unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
            Anon {
                addr: ptr as usize,
                len,
            }
        }

        fn touch(&self, page: usize) {
            assert!(page * (PAGE_SIZE as usize) < self.len);
            let p = (self.addr + page * PAGE_SIZE as usize) as *mut u8;
            // SAFETY: inside our own writable mapping (checked above).
            unsafe { p.write_volatile(0x5a) };
        }

        fn selected(&self, method: Method) -> Vec<u64> {
            let bitmap = region_pages(self.addr, self.len, method).expect("page selection");
            assert_eq!(bitmap.page_count(), (self.len / PAGE_SIZE as usize) as u64);
            (0..bitmap.page_count())
                .filter(|&p| bitmap.get(p))
                .collect()
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmapping exactly the mapping this value owns.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }

    #[test]
    fn mincore_finds_touched_pages_only() {
        let mem = Anon::new(16);
        assert_eq!(mem.selected(Method::Mincore), Vec::<u64>::new());
        for p in [0, 3, 15] {
            mem.touch(p);
        }
        assert_eq!(mem.selected(Method::Mincore), vec![0, 3, 15]);
    }

    #[test]
    fn pagemap_finds_touched_pages_only() {
        let mem = Anon::new(16);
        assert_eq!(mem.selected(Method::Pagemap), Vec::<u64>::new());
        for p in [1, 2, 9] {
            mem.touch(p);
        }
        assert_eq!(mem.selected(Method::Pagemap), vec![1, 2, 9]);
    }

    #[test]
    fn pagemap_reads_across_chunks() {
        // More pages than one pread covers, touched on both sides of the chunk boundary.
        let pages = PAGEMAP_CHUNK_ENTRIES + 8;
        let mem = Anon::new(pages);
        let touched = [
            0,
            PAGEMAP_CHUNK_ENTRIES - 1,
            PAGEMAP_CHUNK_ENTRIES,
            pages - 1,
        ];
        for p in touched {
            mem.touch(p);
        }
        let want: Vec<u64> = touched.iter().map(|&p| p as u64).collect();
        assert_eq!(mem.selected(Method::Pagemap), want);
        assert_eq!(mem.selected(Method::Mincore), want);
    }

    #[test]
    fn pagemap_entries_with_data_are_present_or_swapped() {
        let present = PAGEMAP_PRESENT | 0x1234; // with a PFN
        let swapped = PAGEMAP_SWAPPED | (7 << 5) | 3; // swap offset and type
        let exclusive_only = 1 << 56; // flags without present/swapped: no data
        let soft_dirty_only = 1 << 55;
        assert!(pagemap_entry_has_data(present));
        assert!(pagemap_entry_has_data(swapped));
        assert!(!pagemap_entry_has_data(0));
        assert!(!pagemap_entry_has_data(exclusive_only));
        assert!(!pagemap_entry_has_data(soft_dirty_only));

        let entries = [0, present, swapped, soft_dirty_only, PAGEMAP_PRESENT];
        let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_ne_bytes()).collect();
        let mut bitmap = PageBitmap::new(6);
        // Entries describe pages 2..7; page 6 is past the bitmap and must be ignored.
        mark_pages_with_data(&raw, 2, &mut bitmap);
        let selected: Vec<u64> = (0..6).filter(|&p| bitmap.get(p)).collect();
        assert_eq!(selected, vec![3, 4]);
    }

    #[test]
    fn failed_mincore_is_an_error_not_a_guess() {
        let mem = Anon::new(4);
        // Not page-aligned: mincore refuses (EINVAL) whatever else the process maps meanwhile.
        assert!(region_pages(mem.addr + 1, mem.len - 1, Method::Mincore).is_err());
    }

    /// On a host with swap: a touched page pushed out to swap is still selected by pagemap
    /// (mincore would have lost it). Without swap there is nothing to push out to.
    #[test]
    fn swapped_out_page_is_kept_by_pagemap() {
        if !host_has_swap() {
            eprintln!("SKIPPED: this host has no swap");
            return;
        }
        let mem = Anon::new(8);
        mem.touch(5);
        // SAFETY: advice on our own mapping; MADV_PAGEOUT (Linux 5.4) is best effort.
        let rc =
            unsafe { libc::madvise(mem.addr as *mut libc::c_void, mem.len, libc::MADV_PAGEOUT) };
        if rc != 0 || mem.selected(Method::Mincore).contains(&5) {
            eprintln!("SKIPPED: the kernel kept the page in RAM");
            return;
        }
        assert_eq!(mem.selected(Method::Pagemap), vec![5]);
    }
}
