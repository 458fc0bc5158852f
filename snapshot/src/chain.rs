//! Following a diff snapshot back to its full base, checking every link.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{io_err, Result, SnapshotError};
use crate::manifest::{Manifest, SnapshotKind};
use crate::page_bitmap::{self, PageBitmap};
use crate::writer::memory_path;

/// Longest chain we follow; deeper chains should be merged with [`crate::merge_chain`].
pub const MAX_CHAIN_LEN: usize = 256;

/// One snapshot of a chain, opened and checked.
#[derive(Debug)]
pub struct ChainLayer {
    /// Canonical path of the snapshot directory.
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Pages this layer stores (diffs only).
    pub bitmap: Option<PageBitmap>,
    /// The open memory file, at least `manifest.memory_size` bytes long.
    pub memory: File,
}

impl ChainLayer {
    pub fn memory_path(&self) -> PathBuf {
        memory_path(&self.dir)
    }
}

/// Opens `dir` and all its ancestors, newest first: element 0 is `dir`, the last element is
/// the full base snapshot. Refuses missing or replaced parents, cycles, layout changes and
/// memory files shorter than their manifest says.
pub fn resolve_chain(dir: &Path) -> Result<Vec<ChainLayer>> {
    let mut layers: Vec<ChainLayer> = Vec::new();
    let mut seen_dirs = HashSet::new();
    let mut seen_ids = HashSet::new();
    let mut next = dir.to_path_buf();
    loop {
        if layers.len() >= MAX_CHAIN_LEN {
            return Err(SnapshotError::ChainTooLong {
                path: dir.to_path_buf(),
                max: MAX_CHAIN_LEN,
            });
        }
        let layer = match open_layer(&next) {
            Ok(layer) => layer,
            Err(source) => {
                return Err(match layers.last() {
                    Some(child) => SnapshotError::MissingParent {
                        child: child.dir.clone(),
                        parent: next,
                        source: Box::new(source),
                    },
                    None => source,
                })
            }
        };
        if !seen_dirs.insert(layer.dir.clone())
            || !seen_ids.insert(layer.manifest.snapshot_id.clone())
        {
            return Err(SnapshotError::ChainCycle { path: layer.dir });
        }
        if let Some(child) = layers.last() {
            check_link(child, &layer)?;
        }
        let parent = layer
            .manifest
            .parent
            .as_ref()
            .map(|p| layer.dir.join(&p.dir));
        layers.push(layer);
        match parent {
            Some(parent) => next = parent,
            None => return Ok(layers),
        }
    }
}

fn open_layer(dir: &Path) -> Result<ChainLayer> {
    let canonical = dir
        .canonicalize()
        .map_err(io_err("open snapshot directory", dir))?;
    let manifest = Manifest::read(&canonical)?;
    let path = memory_path(&canonical);
    let memory = File::open(&path).map_err(io_err("open", &path))?;
    let actual = memory.metadata().map_err(io_err("stat", &path))?.len();
    if actual < manifest.memory_size {
        return Err(SnapshotError::MemoryFileTooSmall {
            path,
            expected: manifest.memory_size,
            actual,
        });
    }
    let bitmap = match manifest.kind {
        SnapshotKind::Diff => Some(page_bitmap::read_bitmap(&canonical, manifest.page_count())?),
        SnapshotKind::Full => None,
    };
    Ok(ChainLayer {
        dir: canonical,
        manifest,
        bitmap,
        memory,
    })
}

/// The parent must be the very snapshot the child was taken from, with the same memory layout.
fn check_link(child: &ChainLayer, parent: &ChainLayer) -> Result<()> {
    let expected = child
        .manifest
        .parent
        .as_ref()
        .map(|p| p.id.to_string())
        .unwrap_or_default();
    if parent.manifest.snapshot_id.as_str() != expected {
        return Err(SnapshotError::ParentMismatch {
            child: child.dir.clone(),
            parent: parent.dir.clone(),
            expected,
            found: parent.manifest.snapshot_id.to_string(),
        });
    }
    if parent.manifest.regions != child.manifest.regions {
        return Err(SnapshotError::LayoutMismatch {
            child: child.dir.clone(),
            parent: parent.dir.clone(),
        });
    }
    Ok(())
}

/// For each layer (newest first), the pages it supplies: its own pages minus those a newer
/// layer already supplied. The base layer (last) supplies everything left, so its entry is the
/// complement of all diffs. The returned bitmaps are disjoint and together cover every page.
pub(crate) fn pages_supplied(layers: &[ChainLayer]) -> Vec<PageBitmap> {
    let pages = layers
        .first()
        .map(|l| l.manifest.page_count())
        .unwrap_or_default();
    let mut covered = PageBitmap::new(pages);
    let mut supplied = Vec::with_capacity(layers.len());
    for layer in layers {
        let mine = match &layer.bitmap {
            Some(bitmap) => bitmap.clone(),
            None => PageBitmap::full(pages),
        };
        let mut fresh = mine.clone();
        fresh.and_not(&covered);
        covered.or_assign(&mine);
        supplied.push(fresh);
    }
    supplied
}
