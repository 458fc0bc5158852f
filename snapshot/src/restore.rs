//! Building guest memory from a snapshot (or a chain of them).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::chain::{pages_supplied, resolve_chain, ChainLayer};
use crate::error::{io_err, Result, SnapshotError};
use crate::fsutil;
use crate::layout::{MemoryRegion, PAGE_SIZE};
use crate::manifest::{Manifest, SnapshotId};
use crate::state;

/// Guest memory as the VMM and devices use it (same type as `devices::GuestMemory`).
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// How restored guest memory is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestoreStrategy {
    /// `MAP_PRIVATE` mappings of the memory files: O(1) in guest size, pages load lazily on
    /// first touch, unmodified pages are shared through the page cache by every VM restored
    /// from the same snapshot, and guest writes are copy-on-write (never reach the file).
    #[default]
    Private,
    /// Anonymous memory filled by reading the files: O(data) restore time, no dependency on
    /// the files afterwards.
    Copy,
}

/// Diff page runs at least this long are mapped (`MAP_FIXED`) instead of copied: they stay lazy
/// and shared, while short runs would only add kernel VMAs.
const OVERLAY_MIN_PAGES: u64 = 64;
/// Keeps the VMA count (each overlay splits a mapping) far below `vm.max_map_count`.
const MAX_OVERLAY_MAPS: usize = 4096;

/// A restored snapshot: what the VMM needs to rebuild the VM.
pub struct LoadedSnapshot<T> {
    pub manifest: Manifest,
    pub state: T,
    pub memory: GuestMemory,
}

/// Restores `dir`'s state and memory (following its diff chain).
pub fn load_snapshot<T: crate::state::SavedState>(
    dir: &Path,
    strategy: RestoreStrategy,
) -> Result<LoadedSnapshot<T>> {
    load_opened(open_chain(dir, |_| None)?, strategy)
}

/// [`load_snapshot`], with the state taken from `known` when it was decoded from this very
/// snapshot ([`open_snapshot_reusing`]).
pub fn load_snapshot_reusing<T: crate::state::SavedState + Clone>(
    dir: &Path,
    strategy: RestoreStrategy,
    known: Option<&DecodedState<T>>,
) -> Result<LoadedSnapshot<T>> {
    load_opened(open_chain(dir, |id| known?.state_of(id))?, strategy)
}

fn load_opened<T>(
    opened: OpenedSnapshot<T>,
    strategy: RestoreStrategy,
) -> Result<LoadedSnapshot<T>> {
    let memory = restore_chain(&opened.chain, strategy)?;
    Ok(LoadedSnapshot {
        manifest: opened.manifest,
        state: opened.state,
        memory,
    })
}

/// Builds guest memory for the snapshot at `dir`, resolving its diff chain (newer pages win).
pub fn restore_memory(dir: &Path, strategy: RestoreStrategy) -> Result<GuestMemory> {
    restore_chain(&resolve_chain(dir)?, strategy)
}

fn restore_chain(chain: &[ChainLayer], strategy: RestoreStrategy) -> Result<GuestMemory> {
    let (base, _) = chain
        .split_last()
        .ok_or_else(|| SnapshotError::InvalidRequest("empty snapshot chain".into()))?;
    let layout = &base.manifest.regions;
    let base_file = Arc::new(
        base.memory
            .try_clone()
            .map_err(io_err("duplicate", base.memory_path()))?,
    );

    let mappings = layout
        .iter()
        .map(|region| match strategy {
            RestoreStrategy::Private => map_region(region, Some(&base_file)),
            RestoreStrategy::Copy => map_region(region, None),
        })
        .collect::<Result<Vec<_>>>()?;
    let targets: Vec<Target> = layout
        .iter()
        .zip(&mappings)
        .map(|(region, mapping)| Target {
            region: *region,
            host: mapping.as_ptr(),
        })
        .collect();
    fill_from_chain(chain, &targets, strategy)?;
    guest_memory(layout, mappings)
}

/// Puts the chain's pages into `targets` (mappings laid out as the base's regions): newer diff
/// pages over the base, and with [`RestoreStrategy::Copy`] the base's own data; with
/// [`RestoreStrategy::Private`] the targets already map the base file.
fn fill_from_chain(
    chain: &[ChainLayer],
    targets: &[Target],
    strategy: RestoreStrategy,
) -> Result<()> {
    let (base, diffs) = chain
        .split_last()
        .ok_or_else(|| SnapshotError::InvalidRequest("empty snapshot chain".into()))?;
    if diffs.is_empty() && strategy == RestoreStrategy::Private {
        // A full snapshot mapped privately: the targets already hold everything (no bitmaps to
        // build, which costs a tenth of a millisecond per 2 GiB).
        return Ok(());
    }
    let supplied = pages_supplied(chain);
    let mut overlay_maps = 0usize;
    for (layer, pages) in diffs.iter().zip(&supplied) {
        for (start, count) in pages.runs() {
            let mode = if strategy == RestoreStrategy::Private
                && count >= OVERLAY_MIN_PAGES
                && overlay_maps < MAX_OVERLAY_MAPS
            {
                overlay_maps += 1;
                Fill::Map
            } else {
                Fill::Read
            };
            fill_range(targets, layer, start * PAGE_SIZE, count * PAGE_SIZE, mode)?;
        }
    }
    if strategy == RestoreStrategy::Copy {
        // The base supplies every page no diff did; only its data extents need reading, holes
        // are already zero in fresh anonymous memory.
        if let Some(base_pages) = supplied.last() {
            for (start, count) in base_pages.runs() {
                let (from, to) = (start * PAGE_SIZE, (start + count) * PAGE_SIZE);
                for (data_start, data_end) in
                    fsutil::data_extents(&base.memory, &base.memory_path(), from, to)?
                {
                    fill_range(targets, base, data_start, data_end - data_start, Fill::Read)?;
                }
            }
        }
    }
    Ok(())
}

/// A snapshot whose state is read and whose memory files are open, its memory not mapped yet
/// ([`open_snapshot`]): the caller checks the state before it decides where the memory goes.
pub struct OpenedSnapshot<T> {
    pub manifest: Manifest,
    pub state: T,
    chain: Vec<ChainLayer>,
}

/// Reads `dir`'s state and opens its diff chain's memory files, mapping nothing.
pub fn open_snapshot<T: crate::state::SavedState>(dir: &Path) -> Result<OpenedSnapshot<T>> {
    open_chain(dir, |_| None)
}

/// [`open_snapshot`], with the state taken from `known` when it was decoded from this very
/// snapshot (same snapshot id): decoding `state.bin` is most of an open's time, and a worker
/// starting many sandboxes from one template would decode the same bytes each time.
pub fn open_snapshot_reusing<T: crate::state::SavedState + Clone>(
    dir: &Path,
    known: Option<&DecodedState<T>>,
) -> Result<OpenedSnapshot<T>> {
    open_chain(dir, |id| known?.state_of(id))
}

/// Opens the chain; the state is `known(newest snapshot id)`'s, or read from the newest layer.
fn open_chain<T: crate::state::SavedState>(
    dir: &Path,
    known: impl FnOnce(&SnapshotId) -> Option<T>,
) -> Result<OpenedSnapshot<T>> {
    let chain = resolve_chain(dir)?;
    let newest = chain
        .first()
        .ok_or_else(|| SnapshotError::InvalidRequest("empty snapshot chain".into()))?;
    let state = match known(&newest.manifest.snapshot_id) {
        Some(state) => state,
        None => state::read_state(&newest.dir)?,
    };
    let manifest = newest.manifest.clone();
    Ok(OpenedSnapshot {
        manifest,
        state,
        chain,
    })
}

/// A snapshot's state as decoded once, kept to open that snapshot again without reading and
/// decoding `state.bin` ([`open_snapshot_reusing`], [`load_snapshot_reusing`]). It is used
/// only for the snapshot it was read from: a directory since replaced has a new snapshot id,
/// and its own state is read.
#[derive(Clone)]
pub struct DecodedState<T> {
    snapshot_id: SnapshotId,
    state: T,
}

/// The id only: a VM's state is tens of kilobytes of registers and queues.
impl<T> std::fmt::Debug for DecodedState<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodedState")
            .field("snapshot_id", &self.snapshot_id)
            .finish_non_exhaustive()
    }
}

impl<T: crate::state::SavedState> DecodedState<T> {
    /// Reads `dir`'s snapshot id and state.
    pub fn read(dir: &Path) -> Result<Self> {
        // The manifest first: if the directory is replaced between the two reads, the pair
        // holds the old id and the new state, and the old id never matches again. The other
        // order would pair the new id with the old state.
        let manifest = Manifest::read(dir)?;
        let state = state::read_state(dir)?;
        Ok(Self {
            snapshot_id: manifest.snapshot_id,
            state,
        })
    }
}

impl<T> DecodedState<T> {
    /// The state a snapshot writer just wrote as snapshot `snapshot_id`, kept instead of read
    /// back: `state` must be what `state.bin` of that snapshot decodes to.
    pub fn written(snapshot_id: SnapshotId, state: T) -> Self {
        Self { snapshot_id, state }
    }

    pub fn state(&self) -> &T {
        &self.state
    }

    pub fn snapshot_id(&self) -> &SnapshotId {
        &self.snapshot_id
    }
}

impl<T: Clone> DecodedState<T> {
    /// A copy of the state, if it is snapshot `id`'s.
    fn state_of(&self, id: &SnapshotId) -> Option<T> {
        (&self.snapshot_id == id).then(|| self.state.clone())
    }
}

impl<T> OpenedSnapshot<T> {
    /// The guest memory layout the snapshot's memory file holds.
    pub fn layout(&self) -> &[MemoryRegion] {
        self.chain
            .last()
            .map(|base| base.manifest.regions.as_slice())
            .unwrap_or_default()
    }

    /// Maps the snapshot's memory into `memory`, whose regions must be **unmapped** host
    /// address ranges the caller reserved (a VM shell's RAM, whose memory slots KVM already
    /// knows): each region gets a private (copy-on-write) mapping of the base file, made with
    /// `MAP_FIXED_NOREPLACE` so that it replaces nothing (KVM's MMU notifier has nothing to
    /// walk) and never overwrites a range someone else mapped meanwhile; then the diffs' pages
    /// go over it as [`RestoreStrategy::Private`] puts them. The contents are what a private
    /// restore gives. `memory` must have the snapshot's layout ([`Self::layout`]), checked
    /// before anything is mapped.
    ///
    /// `on_mapped(i)` is called for each region `i` once it is mapped: the caller owns those
    /// mappings and unmaps them, also when an error follows (the contents are then
    /// unspecified).
    pub fn map_into_holes(
        self,
        memory: &GuestMemory,
        on_mapped: &mut dyn FnMut(usize),
    ) -> Result<LoadedSnapshot<T>> {
        let base = self
            .chain
            .last()
            .ok_or_else(|| SnapshotError::InvalidRequest("empty snapshot chain".into()))?;
        let layout = &base.manifest.regions;
        let targets = memory_targets(memory, layout)?;
        for (index, target) in targets.iter().enumerate() {
            let len = usize::try_from(target.region.size).map_err(|_| {
                SnapshotError::GuestMemory(format!("region of {} bytes", target.region.size))
            })?;
            map_into_hole(target.host, len, &base.memory, target.region.file_offset)
                .map_err(io_err("mmap into a VM shell from", base.memory_path()))?;
            on_mapped(index);
        }
        fill_from_chain(&self.chain, &targets, RestoreStrategy::Private)?;
        Ok(LoadedSnapshot {
            manifest: self.manifest,
            state: self.state,
            memory: memory.clone(),
        })
    }
}

/// `memory`'s regions as fill targets, when they are laid out exactly as `layout`.
fn memory_targets(memory: &GuestMemory, layout: &[MemoryRegion]) -> Result<Vec<Target>> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    crate::layout::validate_layout(layout).map_err(SnapshotError::InvalidMemory)?;
    if memory.num_regions() != layout.len() {
        return Err(SnapshotError::InvalidMemory(format!(
            "the snapshot has {} memory regions, the target memory {}",
            layout.len(),
            memory.num_regions()
        )));
    }
    memory
        .iter()
        .zip(layout)
        .map(|(have, want)| {
            if have.start_addr().0 != want.guest_addr || have.len() != want.size {
                return Err(SnapshotError::InvalidMemory(format!(
                    "the snapshot's region at {:#x} ({:#x} bytes) is not the target's at {:#x} \
                     ({:#x} bytes)",
                    want.guest_addr,
                    want.size,
                    have.start_addr().0,
                    have.len()
                )));
            }
            Ok(Target {
                region: *want,
                host: have.as_ptr(),
            })
        })
        .collect()
}

/// Anonymous, untouched guest memory laid out as `layout` (for a lazy restore to fill).
pub fn empty_memory(layout: &[MemoryRegion]) -> Result<GuestMemory> {
    crate::layout::validate_layout(layout).map_err(SnapshotError::InvalidMemory)?;
    let mappings = layout
        .iter()
        .map(|region| map_region(region, None))
        .collect::<Result<Vec<_>>>()?;
    guest_memory(layout, mappings)
}

type Mapping = vm_memory::mmap::MmapRegion<AtomicBitmap>;

/// A read-write mapping of one region: a private (copy-on-write) map of `file` at the region's
/// offset, or untouched anonymous memory.
fn map_region(region: &MemoryRegion, file: Option<&Arc<File>>) -> Result<Mapping> {
    let size = usize::try_from(region.size)
        .map_err(|_| SnapshotError::GuestMemory(format!("region of {} bytes", region.size)))?;
    let builder = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
    let builder = match file {
        Some(file) => builder
            .with_file_offset(FileOffset::from_arc(Arc::clone(file), region.file_offset))
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE),
        None => {
            builder.with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        }
    };
    builder.build().map_err(|source| SnapshotError::Mmap {
        guest_addr: region.guest_addr,
        source,
    })
}

/// Guest memory of `mappings`, placed at their regions' guest addresses.
fn guest_memory(layout: &[MemoryRegion], mappings: Vec<Mapping>) -> Result<GuestMemory> {
    let regions = layout
        .iter()
        .zip(mappings)
        .map(|(region, mapping)| {
            GuestRegionMmap::new(mapping, GuestAddress(region.guest_addr)).ok_or_else(|| {
                SnapshotError::GuestMemory(format!("region at {:#x} overflows", region.guest_addr))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::GuestMemory(e.to_string()))
}

/// The mapping of one region: freshly created and not yet visible to anyone else, or guest
/// memory whose VM has not run yet ([`OpenedSnapshot::map_into_holes`]).
struct Target {
    region: MemoryRegion,
    host: *mut u8,
}

#[derive(Clone, Copy)]
enum Fill {
    /// `pread` into the mapping (the pages become private anonymous copies).
    Read,
    /// Replace the mapping's pages with a private mapping of the layer's file.
    Map,
}

/// Loads memory-file bytes `[offset, offset + len)` of `layer` into the regions they belong to.
fn fill_range(
    targets: &[Target],
    layer: &ChainLayer,
    offset: u64,
    len: u64,
    mode: Fill,
) -> Result<()> {
    let end = offset.saturating_add(len);
    for target in targets {
        let region_start = target.region.file_offset;
        let region_end = region_start.saturating_add(target.region.size);
        let piece_start = offset.max(region_start);
        let piece_end = end.min(region_end);
        if piece_start >= piece_end {
            continue;
        }
        // Both values are within the region, whose size fits in usize (it is mapped).
        let in_region = (piece_start - region_start) as usize;
        let piece_len = (piece_end - piece_start) as usize;
        // SAFETY: `target.host` maps the whole region and `in_region + piece_len` does not
        // exceed its size, so the pointer stays inside the mapping.
        let host = unsafe { target.host.add(in_region) };
        match mode {
            Fill::Read => {
                // SAFETY: the mapping was created by `restore_chain` and has not been handed
                // out yet, so this is the only reference to these bytes.
                let dest = unsafe { std::slice::from_raw_parts_mut(host, piece_len) };
                layer
                    .memory
                    .read_exact_at(dest, piece_start)
                    .map_err(io_err("read", layer.memory_path()))?;
            }
            Fill::Map => map_fixed(host, piece_len, &layer.memory, piece_start)
                .map_err(io_err("mmap overlay from", layer.memory_path()))?,
        }
    }
    Ok(())
}

/// Maps `len` bytes of `file` at `file_offset`, private and read-write, at `host`, which must
/// be unmapped: `MAP_FIXED_NOREPLACE` fails (`EEXIST`) rather than replace anything there.
fn map_into_hole(host: *mut u8, len: usize, file: &File, file_offset: u64) -> std::io::Result<()> {
    // SAFETY: MAP_FIXED_NOREPLACE creates a mapping only where nothing is mapped, so no
    // existing memory (Rust's or anyone's) changes; the caller reserved [host, host + len) for
    // this memory and owns the new mapping.
    let mapped =
        unsafe { map_file_private(host, len, file, file_offset, libc::MAP_FIXED_NOREPLACE) }?;
    if mapped != host.cast() {
        // A kernel before 4.17 read the flag as a hint and mapped elsewhere: undo it.
        // SAFETY: `mapped` is the mapping just made, `len` bytes, known to nobody else.
        unsafe { libc::munmap(mapped, len) };
        return Err(std::io::Error::other(
            "MAP_FIXED_NOREPLACE is not supported by this kernel",
        ));
    }
    Ok(())
}

pub(crate) fn map_fixed(
    host: *mut u8,
    len: usize,
    file: &File,
    file_offset: u64,
) -> std::io::Result<()> {
    // SAFETY: [host, host + len) lies inside a page-aligned mapping owned by guest memory of
    // this crate's callers (unmapped on drop of its MmapRegion). MAP_FIXED swaps exactly those
    // pages atomically, with the same protection, so the range stays mapped throughout. Callers
    // pass a fresh mapping nobody uses yet (restore, and a VM shell's RAM just mapped by
    // `map_into_holes`, whose vCPUs have never run: only KVM knows the addresses, and follows
    // the new pages through its MMU notifier), or a paused guest's
    // memory whose bytes the file range already holds (`remap_private`): nothing observes a
    // change of contents.
    unsafe { map_file_private(host, len, file, file_offset, libc::MAP_FIXED) }.map(|_| ())
}

/// `mmap` of `file` at `file_offset`, private, read-write, not reserving swap, at `host` with
/// `placement` (`MAP_FIXED` or `MAP_FIXED_NOREPLACE`); the address the kernel mapped.
///
/// # Safety
///
/// What `placement` does at `[host, host + len)` must not invalidate memory anyone uses (see
/// the callers).
unsafe fn map_file_private(
    host: *mut u8,
    len: usize,
    file: &File,
    file_offset: u64,
    placement: libc::c_int,
) -> std::io::Result<*mut libc::c_void> {
    let offset = libc::off_t::try_from(file_offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the caller vouches for the placement; the fd is open for the call.
    let mapped = unsafe {
        libc::mmap(
            host.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | placement | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(mapped)
}
