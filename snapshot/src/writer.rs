//! Taking a snapshot: the sparse memory file, then state, bitmap and manifest, assembled in a
//! staging directory and renamed into place.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{io_err, Result, SnapshotError};
use crate::fsutil;
use crate::layout::{MemoryRegion, PAGE_SIZE};
use crate::manifest::{Manifest, PageCounts, ParentRef, SnapshotKind, SnapshotMeta};
use crate::page_bitmap::{self, PageBitmap};
use crate::source::{is_zero, MemorySource};
use crate::staging::StagingDir;
use crate::state;
use crate::target::{Companions, TargetPolicy};

pub use crate::layout::MEMORY_FILE;

/// The largest single write of guest memory into a memory file.
const WRITE_PIECE: usize = 8 << 20;

/// Which pages of guest memory go into the memory file.
#[derive(Clone, Copy, Debug)]
pub enum PageSelection<'a> {
    /// Every page (for when nothing is known about the guest's memory).
    All,
    /// Every page with a non-zero byte. Reads all guest memory but needs no dirty tracking.
    NonZero,
    /// Only pages set in these bitmaps, one per region in region order (bit `i` = page `i` of
    /// the region). For a full snapshot this must cover every page written since the guest's
    /// memory was zero; for a diff, every page written since the parent snapshot.
    Dirty(&'a [PageBitmap]),
}

/// Knobs for [`write_snapshot`].
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteOptions<'a> {
    /// Take a diff against this snapshot directory (requires [`PageSelection::Dirty`]).
    pub parent: Option<&'a Path>,
    /// fsync every file and directory before returning. Off by default: the hot path only
    /// needs the data in the page cache, and a crash loses at most this snapshot.
    pub sync: bool,
    /// Replace a snapshot already at the target. Off: only a missing path or an empty
    /// directory is accepted. Never replaces a directory holding anything else.
    pub replace: bool,
    /// Files the caller keeps next to its snapshots, replaced with it (see [`Companions`]).
    pub companions: Companions,
    /// Memory-file pages to record as the snapshot's working set ([`crate::WORKING_SET_FILE`]).
    pub working_set: Option<&'a PageBitmap>,
}

impl WriteOptions<'_> {
    pub(crate) fn policy(&self) -> TargetPolicy {
        TargetPolicy {
            replace: self.replace,
            companions: self.companions,
        }
    }
}

/// What a memory file write did.
#[derive(Clone, Debug)]
pub struct MemoryWriteOutcome {
    /// Pages stored, in memory-file page numbering.
    pub written: PageBitmap,
    /// Number of `pwrite` calls (one per run of adjacent selected pages, or per 8 MiB of one).
    pub write_calls: u64,
    pub bytes_written: u64,
}

pub(crate) fn memory_path(dir: &Path) -> PathBuf {
    dir.join(MEMORY_FILE)
}

/// Writes a new sparse memory file at `path` (which must not exist): its length is the whole
/// guest memory, but only the selected pages are written, each run with one `pwrite` at its
/// own offset, so unselected pages stay holes.
pub fn write_memory_file(
    path: &Path,
    source: &MemorySource<'_>,
    selection: PageSelection<'_>,
    sync: bool,
) -> Result<MemoryWriteOutcome> {
    let layout = source.layout();
    if let PageSelection::Dirty(bitmaps) = selection {
        if bitmaps.len() != layout.len() {
            return Err(SnapshotError::InvalidRequest(format!(
                "{} dirty bitmaps for {} memory regions",
                bitmaps.len(),
                layout.len()
            )));
        }
        for (index, (bitmap, region)) in bitmaps.iter().zip(layout).enumerate() {
            if bitmap.page_count() != region.page_count() {
                return Err(SnapshotError::InvalidRequest(format!(
                    "dirty bitmap {index} covers {} pages, region has {}",
                    bitmap.page_count(),
                    region.page_count()
                )));
            }
        }
    }
    let total_bytes = layout.iter().map(|r| r.size).sum::<u64>();
    let file = fsutil::create_private(path)?;
    file.set_len(total_bytes)
        .map_err(io_err("set length of", path))?;

    let mut writer = RunWriter {
        file: &file,
        path,
        written: PageBitmap::new(total_bytes / PAGE_SIZE),
        write_calls: 0,
        bytes_written: 0,
    };
    for (index, region) in layout.iter().enumerate() {
        let bytes = source
            .region_bytes(index)
            .ok_or_else(|| SnapshotError::InvalidMemory(format!("region {index} vanished")))?;
        let first_page = region.first_page();
        match selection {
            PageSelection::All => writer.write_run(bytes, first_page, 0, region.page_count())?,
            PageSelection::Dirty(bitmaps) => {
                if let Some(bitmap) = bitmaps.get(index) {
                    for (start, count) in bitmap.runs() {
                        writer.write_run(bytes, first_page, start, count)?;
                    }
                }
            }
            PageSelection::NonZero => {
                let mut run_start: Option<u64> = None;
                for (page, contents) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    let page = page as u64;
                    match (is_zero(contents), run_start) {
                        (false, None) => run_start = Some(page),
                        (true, Some(start)) => {
                            writer.write_run(bytes, first_page, start, page - start)?;
                            run_start = None;
                        }
                        _ => {}
                    }
                }
                if let Some(start) = run_start {
                    writer.write_run(bytes, first_page, start, region.page_count() - start)?;
                }
            }
        }
    }
    if sync {
        file.sync_all().map_err(io_err("fsync", path))?;
    }
    Ok(MemoryWriteOutcome {
        written: writer.written,
        write_calls: writer.write_calls,
        bytes_written: writer.bytes_written,
    })
}

struct RunWriter<'f> {
    file: &'f File,
    path: &'f Path,
    written: PageBitmap,
    write_calls: u64,
    bytes_written: u64,
}

impl RunWriter<'_> {
    /// Writes pages `[start, start + count)` of a region whose first file page is `first_page`.
    fn write_run(&mut self, region: &[u8], first_page: u64, start: u64, count: u64) -> Result<()> {
        let begin = (start * PAGE_SIZE) as usize;
        let end = ((start + count) * PAGE_SIZE) as usize;
        let bytes = region.get(begin..end).ok_or_else(|| {
            SnapshotError::InvalidMemory(format!("page run {start}+{count} is outside its region"))
        })?;
        let offset = (first_page + start) * PAGE_SIZE;
        // In pieces: one multi-GiB write into the page cache ran 4-10× slower here than the
        // same bytes in 8 MiB writes (measured with one and two threads, and O_DIRECT).
        for (index, piece) in bytes.chunks(WRITE_PIECE).enumerate() {
            self.file
                .write_all_at(piece, offset + (index * WRITE_PIECE) as u64)
                .map_err(io_err("write", self.path))?;
            self.write_calls += 1;
        }
        self.written.set_range(first_page + start, count);
        self.bytes_written += bytes.len() as u64;
        Ok(())
    }
}

/// Takes a snapshot into `dir`: `memory.bin`, `state.bin`, `pages.bitmap` (diffs only) and
/// `manifest.json`. The files are assembled in a sibling staging directory and moved into place
/// at the end. `dir` must be missing or an empty directory, or hold a snapshot and
/// `options.replace` be set: then it is replaced atomically, and files a running VM maps from it
/// are never modified (they are unlinked, not truncated). Anything else is refused
/// ([`crate::SnapshotError::TargetRefused`]) before any file is written.
pub fn write_snapshot<T: Serialize>(
    dir: &Path,
    state: &T,
    memory: &MemorySource<'_>,
    selection: PageSelection<'_>,
    meta: &SnapshotMeta,
    options: &WriteOptions<'_>,
) -> Result<Manifest> {
    let parent = match options.parent {
        Some(parent_dir) => Some(prepare_parent(dir, parent_dir, memory, selection)?),
        None => None,
    };

    let staging = StagingDir::create(dir, options.policy())?;
    let outcome = write_memory_file(
        &memory_path(staging.path()),
        memory,
        selection,
        options.sync,
    )?;
    let dirty_info = matches!(selection, PageSelection::Dirty(_));
    let manifest = finish_snapshot(
        staging,
        dir,
        state,
        &Finish {
            layout: memory.layout(),
            written: &outcome.written,
            dirty_info,
            parent,
            meta,
            options,
        },
    )?;
    tracing::debug!(
        dir = %dir.display(),
        id = %manifest.snapshot_id,
        pages_written = manifest.pages.written,
        write_calls = outcome.write_calls,
        "snapshot written"
    );
    Ok(manifest)
}

/// What [`finish_snapshot`] records next to a staged `memory.bin`.
pub(crate) struct Finish<'a> {
    pub layout: &'a [MemoryRegion],
    /// Pages `memory.bin` holds, in memory-file page numbering.
    pub written: &'a PageBitmap,
    /// The pages were chosen from dirty information (they count as `dirty` in the manifest).
    pub dirty_info: bool,
    pub parent: Option<ParentRef>,
    pub meta: &'a SnapshotMeta,
    pub options: &'a WriteOptions<'a>,
}

/// Writes state, bitmap (diffs) and manifest into `staging`, whose `memory.bin` is in place,
/// then moves the snapshot to `dir`.
pub(crate) fn finish_snapshot<T: Serialize>(
    staging: StagingDir,
    dir: &Path,
    state: &T,
    finish: &Finish<'_>,
) -> Result<Manifest> {
    let sync = finish.options.sync;
    state::write_state_with(staging.path(), state, sync)?;
    let written = finish.written.count_ones();
    let counts = PageCounts {
        total: finish.written.page_count(),
        written,
        dirty: if finish.dirty_info { written } else { 0 },
    };
    let kind = if finish.parent.is_some() {
        page_bitmap::write_bitmap(staging.path(), finish.written, sync)?;
        SnapshotKind::Diff
    } else {
        SnapshotKind::Full
    };
    let manifest = Manifest::new(
        kind,
        finish.parent.clone(),
        finish.meta,
        finish.layout.to_vec(),
        counts,
    )?;
    if let Some(set) = finish.options.working_set {
        if set.page_count() == finish.written.page_count() {
            page_bitmap::write_working_set(staging.path(), set, sync)?;
        }
    }
    manifest.write_with(staging.path(), sync)?;
    staging.install(dir, sync)?;
    Ok(manifest)
}

/// Checks a diff's parent and returns the reference to store in the child's manifest.
fn prepare_parent(
    dir: &Path,
    parent_dir: &Path,
    memory: &MemorySource<'_>,
    selection: PageSelection<'_>,
) -> Result<ParentRef> {
    if !matches!(selection, PageSelection::Dirty(_)) {
        return Err(SnapshotError::InvalidRequest(
            "a diff snapshot needs dirty page bitmaps (PageSelection::Dirty)".into(),
        ));
    }
    let parent_manifest =
        Manifest::read(parent_dir).map_err(|source| SnapshotError::MissingParent {
            child: dir.to_path_buf(),
            parent: parent_dir.to_path_buf(),
            source: Box::new(source),
        })?;
    if parent_manifest.regions != memory.layout() {
        return Err(SnapshotError::LayoutMismatch {
            child: dir.to_path_buf(),
            parent: parent_dir.to_path_buf(),
        });
    }
    let parent_canonical = parent_dir
        .canonicalize()
        .map_err(io_err("resolve parent directory", parent_dir))?;
    let child_container = fsutil::parent_dir(dir)
        .canonicalize()
        .map_err(io_err("resolve directory containing", dir))?;
    let child_name = dir.file_name().ok_or_else(|| {
        SnapshotError::InvalidRequest(format!("{} has no directory name", dir.display()))
    })?;
    if child_container.join(child_name) == parent_canonical {
        return Err(SnapshotError::InvalidRequest(format!(
            "a diff cannot replace its own parent {}",
            parent_dir.display()
        )));
    }
    // Siblings are linked relatively so a directory of snapshots can be moved as a whole.
    let stored_dir = match (parent_canonical.parent(), parent_canonical.file_name()) {
        (Some(container), Some(name)) if container == child_container => Path::new("..").join(name),
        _ => parent_canonical.clone(),
    };
    Ok(ParentRef {
        dir: stored_dir,
        id: parent_manifest.snapshot_id,
    })
}
