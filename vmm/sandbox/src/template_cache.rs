//! Templates decoded once per manager: a template's layout (disks, NICs, vsock) and its
//! snapshot state, so that a create or fork from it reads neither `state.bin` nor
//! `sandbox.json` again. Decoding the state twice (once to plan, once to restore) was about
//! 0.3 ms of a pooled create's 1.2–1.5 ms host part on the development host.
//!
//! An entry is used only while the template's files are the ones it was read from: their
//! inode, size and change times are compared at each use (a few `statx` calls). The restore
//! checks the state once more against the snapshot id it then reads
//! (`snapshot::open_snapshot_reusing`). Entries hold no open files, so a deleted template's
//! disk space is freed at once.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use snapshot::DecodedState;
use vmm::vm::VmSnapshotState;

use super::checkpoint_files::{self, TemplateLayout, SANDBOX_FILE};
use super::error::Result;

/// Templates kept at most. A worker uses a handful; past this the oldest entry goes.
const MAX_TEMPLATES: usize = 64;

/// A template as a start needs it.
#[derive(Clone)]
pub struct Template {
    pub layout: TemplateLayout,
    pub state: Arc<DecodedState<VmSnapshotState>>,
}

#[derive(Default)]
pub struct TemplateCache {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    by_dir: HashMap<PathBuf, Entry>,
    next_seq: u64,
}

struct Entry {
    stamp: Stamp,
    template: Template,
    /// Insertion order, for eviction.
    seq: u64,
}

/// What the file system says of a template's files: one slot per file, `None` when it is
/// missing. A file replaced (rename) or rewritten in place differs in one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<Option<FileStamp>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    /// `None` when a file cannot be examined: the template is then read, not cached, and the
    /// read gives the error.
    fn of(dir: &Path) -> Option<Self> {
        let files = [snapshot::MANIFEST_FILE, snapshot::STATE_FILE, SANDBOX_FILE];
        let mut stamps = Vec::with_capacity(files.len());
        for name in files {
            stamps.push(match std::fs::metadata(dir.join(name)) {
                Ok(m) => Some(FileStamp {
                    dev: m.dev(),
                    ino: m.ino(),
                    size: m.size(),
                    mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
                    ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(_) => return None,
            });
        }
        Some(Self(stamps))
    }
}

impl TemplateCache {
    /// The template in `dir`, from the cache while its files are unchanged, read otherwise.
    pub fn get(&self, dir: &Path) -> Result<Template> {
        let key = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        // Taken before the read: a change during the read leaves an entry that never matches.
        let stamp = Stamp::of(&key);
        if let Some(stamp) = &stamp {
            if let Some(entry) = self.lock().by_dir.get(&key) {
                if &entry.stamp == stamp {
                    return Ok(entry.template.clone());
                }
            }
        }
        let template = read(dir)?;
        if let Some(stamp) = stamp {
            self.insert(key, stamp, template.clone());
        }
        Ok(template)
    }

    fn insert(&self, key: PathBuf, stamp: Stamp, template: Template) {
        let mut entries = self.lock();
        if entries.by_dir.len() >= MAX_TEMPLATES && !entries.by_dir.contains_key(&key) {
            let oldest = entries
                .by_dir
                .iter()
                .min_by_key(|(_, e)| e.seq)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                entries.by_dir.remove(&oldest);
            }
        }
        let seq = entries.next_seq;
        entries.next_seq += 1;
        entries.by_dir.insert(
            key,
            Entry {
                stamp,
                template,
                seq,
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_dir.len()
    }
}

fn read(dir: &Path) -> Result<Template> {
    let state = DecodedState::<VmSnapshotState>::read(dir)
        .map_err(|e| checkpoint_files::bad_state(dir, e))?;
    let layout = checkpoint_files::layout_of(dir, state.state())?;
    Ok(Template {
        layout,
        state: Arc::new(state),
    })
}

#[cfg(test)]
mod tests;
