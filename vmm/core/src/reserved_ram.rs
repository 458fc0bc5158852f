//! Guest RAM for VM shells (`vm::VmShell`): host address ranges set aside for a shell's memory
//! slots and left **unmapped** until a restore maps a snapshot's memory file there
//! (`MAP_FIXED_NOREPLACE`).
//!
//! Why holes: KVM registers a shell's memory slots when the shell is built. Replacing a mapping
//! under a registered slot runs KVM's MMU notifier over the whole replaced range (with shadow
//! paging it walks a record per 4 KiB page: a quarter of a millisecond for a fully written
//! 2 GiB snapshot on the development host, a quarter of a warm restore). Mapping into a hole
//! replaces nothing, so the notifier never runs.
//!
//! Holes are at risk of being filled by anyone's next `mmap`. The ranges therefore come from a
//! window far below where the kernel's top-down search places mappings (below the executable,
//! above the first terabytes), and every mapping into them is `MAP_FIXED_NOREPLACE`: a range
//! someone did take is refused, never overwritten.
//!
//! The guest memory built over a hole does not own its mappings (vm-memory unmaps only what it
//! mapped itself). [`ReservedRam`] does: it unmaps what it mapped once no copy of the guest
//! memory is left; a copy still held when it drops defers that to a later sweep.

use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestRegionMmap};

use crate::boot::layout::ram_ranges;
use devices::GuestMemory;

/// The window shells' RAM is placed in: below a position-independent executable (loaded near
/// 85 TiB) and far below the mmap area (growing down from near 128 TiB). The kernel's search
/// for a free range reaches it only once tens of terabytes are mapped.
const WINDOW_START: usize = 0x1000_0000_0000;
const WINDOW_END: usize = 0x4000_0000_0000;
/// Ranges start 2 MiB-aligned, so guest huge pages can be host huge pages.
const ALIGN: usize = 2 << 20;
/// Candidates tried before a reservation gives up (a candidate is dropped when something
/// already maps part of it).
const MAX_TRIES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ReservedRamError {
    #[error("{0} MiB of guest RAM does not fit the shell address window")]
    TooLarge(u64),
    #[error("no free range of {0} bytes in the shell address window")]
    WindowFull(usize),
    #[error("probing the shell address window: {0}")]
    Probe(std::io::Error),
    #[error("this kernel does not honour MAP_FIXED_NOREPLACE (Linux >= 4.17 needed)")]
    NoReplaceUnsupported,
    #[error("guest memory over the reserved range: {0}")]
    Layout(String),
}

/// Free ranges of the window, `(start, len)`, sorted by start.
static FREE: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
/// Whether [`FREE`] has been seeded with the whole window.
static SEEDED: std::sync::Once = std::sync::Once::new();
/// Reservations dropped while a copy of their guest memory was still held.
static DEFERRED: Mutex<Vec<Released>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn free_list() -> MutexGuard<'static, Vec<(usize, usize)>> {
    SEEDED.call_once(|| lock(&FREE).push((WINDOW_START, WINDOW_END - WINDOW_START)));
    lock(&FREE)
}

/// Takes the first free range of `len` bytes (a multiple of [`ALIGN`]).
fn take_range(len: usize) -> Option<usize> {
    let mut free = free_list();
    let index = free.iter().position(|&(_, size)| size >= len)?;
    let (start, size) = free[index];
    if size == len {
        free.remove(index);
    } else {
        free[index] = (start + len, size - len);
    }
    Some(start)
}

/// Gives `[start, start + len)` back, merged with its neighbours.
fn give_back(start: usize, len: usize) {
    let mut free = free_list();
    let at = free.partition_point(|&(s, _)| s < start);
    free.insert(at, (start, len));
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(free.len());
    for &(s, l) in free.iter() {
        match merged.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += l,
            _ => merged.push((s, l)),
        }
    }
    *free = merged;
}

/// Whether `[addr, addr + len)` is wholly unmapped: it is mapped `PROT_NONE` with
/// `MAP_FIXED_NOREPLACE` (which fails if any page is taken) and unmapped again.
fn is_hole(addr: usize, len: usize) -> Result<bool, ReservedRamError> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; a new PROT_NONE mapping
    // that nobody knows of is unmapped right away.
    let got = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_NORESERVE
                | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if got == libc::MAP_FAILED {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EEXIST) => Ok(false),
            _ => Err(ReservedRamError::Probe(err)),
        };
    }
    // SAFETY: `got` is the mapping just made above, `len` bytes long, used by nothing.
    unsafe { libc::munmap(got, len) };
    if got as usize != addr {
        // A kernel before 4.17 took the flag as a hint and mapped elsewhere.
        return Err(ReservedRamError::NoReplaceUnsupported);
    }
    Ok(true)
}

/// A shell's guest RAM: regions laid out as a boot of the same size lays them out, at host
/// addresses in a reserved, unmapped range. Restores map memory into it region by region and
/// [`ReservedRam::mark_mapped`] what they mapped; dropped, it unmaps exactly that.
pub struct ReservedRam {
    start: usize,
    span: usize,
    regions: Vec<Arc<GuestRegionMmap<AtomicBitmap>>>,
    /// Per region: whether this reservation mapped it (and so must unmap it).
    mapped: Vec<bool>,
}

impl std::fmt::Debug for ReservedRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReservedRam")
            .field("start", &format_args!("{:#x}", self.start))
            .field("span", &self.span)
            .field("mapped", &self.mapped)
            .finish()
    }
}

impl ReservedRam {
    /// Sets aside host addresses for `mem_mib` MiB of guest RAM; maps nothing.
    pub fn reserve(mem_mib: u64) -> Result<Self, ReservedRamError> {
        sweep();
        let size = mem_mib
            .checked_mul(1 << 20)
            .filter(|s| *s <= 1 << 46)
            .ok_or(ReservedRamError::TooLarge(mem_mib))?;
        let ranges = ram_ranges(size);
        // Each region starts aligned, one after the other.
        let mut offsets = Vec::with_capacity(ranges.len());
        let mut span = 0usize;
        for &(_, len) in &ranges {
            let len = usize::try_from(len).map_err(|_| ReservedRamError::TooLarge(mem_mib))?;
            offsets.push(span);
            span = span
                .checked_add(len.div_ceil(ALIGN) * ALIGN)
                .ok_or(ReservedRamError::TooLarge(mem_mib))?;
        }
        let start = Self::find_hole(span)?;
        let mut regions = Vec::with_capacity(ranges.len());
        for (&(guest, len), offset) in ranges.iter().zip(offsets) {
            let len = len as usize; // fits: checked above
            let host = (start + offset) as *mut u8;
            // SAFETY: `host..host + len` lies in the range just reserved for this shell. It is
            // not mapped yet: nothing reads or writes it through this region before a restore
            // has mapped it (`VmShell` hands the memory only to KVM, which records addresses
            // and touches them only when a vCPU runs, after the restore).
            let mapping = unsafe {
                MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                    .with_raw_mmap_pointer(host)
            }
            .build()
            .map_err(|e| ReservedRamError::Layout(e.to_string()))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(guest)).ok_or_else(|| {
                ReservedRamError::Layout(format!("region at {guest:#x} overflows"))
            })?;
            regions.push(Arc::new(region));
        }
        let mapped = vec![false; regions.len()];
        let ram = Self {
            start,
            span,
            regions,
            mapped,
        };
        ram.memory()?; // checks the layout once
        Ok(ram)
    }

    fn find_hole(span: usize) -> Result<usize, ReservedRamError> {
        for _ in 0..MAX_TRIES {
            let start = take_range(span).ok_or(ReservedRamError::WindowFull(span))?;
            match is_hole(start, span) {
                Ok(true) => return Ok(start),
                // Something maps part of it: leave it out of the free list for good.
                Ok(false) => tracing::warn!(
                    "shell RAM: {start:#x}+{span:#x} is partly mapped by something else; skipped"
                ),
                Err(e) => {
                    give_back(start, span);
                    return Err(e);
                }
            }
        }
        Err(ReservedRamError::WindowFull(span))
    }

    /// The guest memory over this reservation (its regions are this reservation's).
    pub fn memory(&self) -> Result<GuestMemory, ReservedRamError> {
        GuestMemory::from_arc_regions(self.regions.clone())
            .map_err(|e| ReservedRamError::Layout(e.to_string()))
    }

    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// Records that region `index` was mapped (wholly, `MAP_FIXED_NOREPLACE`) by a restore:
    /// this reservation unmaps it when it goes.
    pub fn mark_mapped(&mut self, index: usize) {
        if let Some(flag) = self.mapped.get_mut(index) {
            *flag = true;
        }
    }
}

impl Drop for ReservedRam {
    fn drop(&mut self) {
        let released = Released {
            start: self.start,
            span: self.span,
            regions: std::mem::take(&mut self.regions),
            mapped: std::mem::take(&mut self.mapped),
        };
        if let Some(held) = released.try_unmap() {
            lock(&DEFERRED).push(held);
        }
        sweep();
    }
}

/// A dropped reservation waiting for the last copy of its guest memory to go.
struct Released {
    start: usize,
    span: usize,
    regions: Vec<Arc<GuestRegionMmap<AtomicBitmap>>>,
    mapped: Vec<bool>,
}

impl Released {
    /// Unmaps what was mapped and frees the range, unless a copy of the memory is still held
    /// (then it is returned, to try again later).
    fn try_unmap(self) -> Option<Self> {
        // Only this list holds a region when its count is 1, and nothing can copy it from here.
        if self.regions.iter().any(|r| Arc::strong_count(r) > 1) {
            return Some(self);
        }
        for (region, mapped) in self.regions.iter().zip(&self.mapped) {
            if *mapped {
                use vm_memory::GuestMemoryRegion;
                // SAFETY: the restore mapped this whole region (MAP_FIXED_NOREPLACE, so the
                // pages were ours), and no copy of the guest memory over it is left.
                unsafe { libc::munmap(region.as_ptr().cast(), region.len() as usize) };
            }
        }
        // A region never mapped may have been taken meanwhile: the next reservation's probe
        // finds out and skips it.
        give_back(self.start, self.span);
        None
    }
}

/// Finishes deferred releases whose memory is no longer held.
fn sweep() {
    let pending = std::mem::take(&mut *lock(&DEFERRED));
    if pending.is_empty() {
        return;
    }
    let still: Vec<Released> = pending
        .into_iter()
        .filter_map(Released::try_unmap)
        .collect();
    lock(&DEFERRED).extend(still);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    fn map_anon_noreplace(addr: *mut u8, len: usize) -> bool {
        // SAFETY: NOREPLACE maps only where nothing is mapped.
        let got = unsafe {
            libc::mmap(
                addr.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        got == addr.cast()
    }

    #[test]
    fn a_reservation_is_an_unmapped_range_in_the_window_with_a_boot_layout() {
        let ram = ReservedRam::reserve(64).unwrap();
        assert!(ram.start >= WINDOW_START && ram.start + ram.span <= WINDOW_END);
        assert_eq!(ram.start % ALIGN, 0);
        assert!(is_hole(ram.start, ram.span).unwrap());
        let memory = ram.memory().unwrap();
        assert_eq!(memory.num_regions(), ram_ranges(64 << 20).len());
        assert_eq!(memory.iter().map(|r| r.len()).sum::<u64>(), 64 << 20);
    }

    #[test]
    fn what_a_restore_mapped_is_unmapped_once_the_last_copy_goes() {
        let mut ram = ReservedRam::reserve(16).unwrap();
        let memory = ram.memory().unwrap();
        let region = memory.iter().next().unwrap();
        assert!(map_anon_noreplace(region.as_ptr(), region.len() as usize));
        ram.mark_mapped(0);
        memory.write_obj(0xabcd_u32, GuestAddress(0x1000)).unwrap();
        let (start, span) = (ram.start, ram.span);
        drop(ram);
        // A copy is still held: the memory stays mapped and readable.
        assert_eq!(
            memory.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xabcd
        );
        assert!(!is_hole(start, span).unwrap());
        drop(memory);
        sweep();
        assert!(is_hole(start, span).unwrap());
    }

    #[test]
    fn a_range_someone_else_mapped_is_never_unmapped_nor_handed_out_again() {
        let ram = ReservedRam::reserve(16).unwrap();
        let (start, span) = (ram.start, ram.span);
        // Someone maps into the hole while the shell waits.
        assert!(map_anon_noreplace(start as *mut u8, 4096));
        // SAFETY: the page was just mapped read-write above.
        unsafe { (start as *mut u8).write(7) };
        drop(ram); // never mapped by a restore: nothing of its own to unmap
                   // SAFETY: as above; still mapped.
        assert_eq!(unsafe { (start as *mut u8).read() }, 7);
        // The next reservations skip the taken range.
        let next = ReservedRam::reserve(16).unwrap();
        assert!(next.start + next.span <= start || next.start >= start + span);
        // SAFETY: the test's own page.
        unsafe { libc::munmap(start as *mut libc::c_void, 4096) };
    }

    #[test]
    fn free_ranges_merge_when_given_back() {
        let a = take_range(ALIGN).unwrap();
        let b = take_range(ALIGN).unwrap();
        give_back(a, ALIGN);
        give_back(b, ALIGN);
        let free = free_list();
        assert!(free.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
    }
}
