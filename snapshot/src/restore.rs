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
use crate::manifest::Manifest;
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
    let opened = open_snapshot(dir)?;
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
    let chain = resolve_chain(dir)?;
    let newest = chain
        .first()
        .ok_or_else(|| SnapshotError::InvalidRequest("empty snapshot chain".into()))?;
    let state = state::read_state(&newest.dir)?;
    let manifest = newest.manifest.clone();
    Ok(OpenedSnapshot {
        manifest,
        state,
        chain,
    })
}

impl<T> OpenedSnapshot<T> {
    /// The guest memory layout the snapshot's memory file holds.
    pub fn layout(&self) -> &[MemoryRegion] {
        self.chain
            .last()
            .map(|base| base.manifest.regions.as_slice())
            .unwrap_or_default()
    }

    /// Maps the snapshot's memory over `memory`, at the same host addresses, with the contents
    /// a [`RestoreStrategy::Private`] restore gives (the base file copy-on-write, the diffs'
    /// long runs mapped over it, short ones read): so whoever already knows those addresses
    /// (KVM's memory slots) sees the snapshot's pages without being told.
    ///
    /// `memory` must be untouched anonymous memory (it reads as zeroes): only the base file's
    /// data extents are mapped over it, its holes stay that memory. The contents are the same
    /// (a hole reads as zeroes either way), and replacing less of a mapping KVM has registered
    /// costs less: each replaced range makes KVM walk its records of that range (about
    /// 0.25 ms per GiB with shadow paging on the development host). `memory` must have the
    /// snapshot's layout ([`Self::layout`]), checked before anything is mapped. On an error
    /// part of `memory` may already map the snapshot: its contents are then unspecified.
    pub fn map_over_untouched(self, memory: &GuestMemory) -> Result<LoadedSnapshot<T>> {
        let base = self
            .chain
            .last()
            .ok_or_else(|| SnapshotError::InvalidRequest("empty snapshot chain".into()))?;
        let layout = &base.manifest.regions;
        let targets = memory_targets(memory, layout)?;
        for target in &targets {
            let (from, size) = (target.region.file_offset, target.region.size);
            let to = from.saturating_add(size);
            let extents = fsutil::data_extents(&base.memory, &base.memory_path(), from, to)?;
            if extents.len() > MAX_OVERLAY_MAPS {
                // A fragmented file would split the mapping into too many VMAs: all of it.
                fill_range(std::slice::from_ref(target), base, from, size, Fill::Map)?;
                continue;
            }
            for (start, end) in extents {
                // Whole pages: extents are file-system blocks, the region is page-aligned.
                let start = start - start % PAGE_SIZE;
                let end = end.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE).min(to);
                if end > start {
                    fill_range(
                        std::slice::from_ref(target),
                        base,
                        start,
                        end - start,
                        Fill::Map,
                    )?;
                }
            }
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
/// memory whose VM has not run yet ([`OpenedSnapshot::map_over_untouched`]).
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

pub(crate) fn map_fixed(
    host: *mut u8,
    len: usize,
    file: &File,
    file_offset: u64,
) -> std::io::Result<()> {
    let offset = libc::off_t::try_from(file_offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: [host, host + len) lies inside a page-aligned mapping owned by guest memory of
    // this crate's callers (unmapped on drop of its MmapRegion). MAP_FIXED swaps exactly those
    // pages atomically, with the same protection, so the range stays mapped throughout. Callers
    // pass a fresh mapping nobody uses yet (restore), a VM shell's RAM whose vCPUs have never
    // run and which no device has been given yet (`map_over_untouched`: only KVM knows the
    // addresses, and follows the new pages through its MMU notifier), or a paused guest's
    // memory whose bytes the file range already holds (`remap_private`): nothing observes a
    // change of contents.
    let mapped = unsafe {
        libc::mmap(
            host.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
