//! Where a snapshot may go. A snapshot is written only to a path that does not exist, to an empty
//! directory, or — when the caller asks to replace it — to a directory holding nothing but a
//! dormouse snapshot (plus the caller's declared companion files). Anything else is refused
//! before anything is written, and replacing deletes only the files a snapshot consists of,
//! never a whole tree: a mistyped `--dir /var/lib` must cost nothing.

use std::ffi::{OsStr, OsString};
use std::fs::{self, FileType};
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{io_err, Result, SnapshotError};
use crate::layout::MEMORY_FILE;
use crate::manifest::MANIFEST_FILE;
use crate::page_bitmap::{BITMAP_FILE, WORKING_SET_FILE};
use crate::state::STATE_FILE;

/// The files a snapshot directory consists of (`pages.bitmap` only for diffs).
pub const SNAPSHOT_FILES: [&str; 5] = [
    MANIFEST_FILE,
    STATE_FILE,
    MEMORY_FILE,
    BITMAP_FILE,
    WORKING_SET_FILE,
];

/// Recognises files a caller keeps next to its snapshot (e.g. the sandbox library's disk copies):
/// with `replace` they count as part of the old snapshot and are replaced with it.
pub type Companions = Option<fn(&OsStr) -> bool>;

/// What a snapshot target may be, as the caller allows.
#[derive(Clone, Copy, Debug, Default)]
pub struct TargetPolicy {
    /// An existing snapshot there may be replaced.
    pub replace: bool,
    pub companions: Companions,
}

/// What is at a snapshot target today.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TargetKind {
    Missing,
    EmptyDir,
    /// A dormouse snapshot the caller allowed us to replace.
    Snapshot,
}

pub(crate) fn refused(path: &Path, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::TargetRefused {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn kind_name(file_type: FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_file() {
        "a regular file"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "a device node"
    } else {
        "not a directory"
    }
}

/// Checks `dir` against `policy` without changing anything.
pub(crate) fn check_target(dir: &Path, policy: TargetPolicy) -> Result<TargetKind> {
    // Without a trailing slash: `link/` would look through a symlink.
    let dir = &dir.components().collect::<PathBuf>();
    let meta = match fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(TargetKind::Missing),
        Err(e) => return Err(io_err("inspect snapshot target", dir)(e)),
    };
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        return Err(refused(
            dir,
            "it is a symbolic link (name the directory itself)",
        ));
    }
    if !file_type.is_dir() {
        return Err(refused(
            dir,
            format!("it exists and is {}", kind_name(file_type)),
        ));
    }
    let contents = Contents::of(dir, policy.companions)?;
    if contents.ours.is_empty() && contents.foreign.is_empty() {
        return Ok(TargetKind::EmptyDir);
    }
    contents.refusal(dir)?;
    if !policy.replace {
        return Err(refused(
            dir,
            "it already holds a dormouse snapshot; ask to replace it \
             (--replace, \"replace\": true) to overwrite it",
        ));
    }
    Ok(TargetKind::Snapshot)
}

/// The entries of a directory, split into a snapshot's (or companion) regular files and the rest.
pub(crate) struct Contents {
    pub ours: Vec<OsString>,
    pub foreign: Vec<OsString>,
    has_manifest: bool,
}

impl Contents {
    pub(crate) fn of(dir: &Path, companions: Companions) -> Result<Self> {
        let mut contents = Contents {
            ours: Vec::new(),
            foreign: Vec::new(),
            has_manifest: false,
        };
        for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let entry = entry.map_err(io_err("list", dir))?;
            let name = entry.file_name();
            // Symlinks and subdirectories are never ours, whatever their name.
            let regular = entry.file_type().is_ok_and(|t| t.is_file());
            let snapshot_file = SNAPSHOT_FILES.iter().any(|f| name == OsStr::new(f));
            let companion = companions.is_some_and(|is_companion| is_companion(&name));
            if regular && (snapshot_file || companion) {
                contents.has_manifest |= name == OsStr::new(MANIFEST_FILE);
                contents.ours.push(name);
            } else {
                contents.foreign.push(name);
            }
        }
        contents.foreign.sort();
        Ok(contents)
    }

    /// Why a non-empty directory with these contents is not a snapshot dormouse may replace.
    pub(crate) fn refusal(&self, dir: &Path) -> Result<()> {
        if !self.foreign.is_empty() {
            const SHOWN: usize = 5;
            let mut names: Vec<String> = self
                .foreign
                .iter()
                .take(SHOWN)
                .map(|n| format!("{:?}", n.to_string_lossy()))
                .collect();
            if self.foreign.len() > SHOWN {
                names.push(format!("and {} more", self.foreign.len() - SHOWN));
            }
            return Err(refused(
                dir,
                format!(
                    "it is a non-empty directory with entries that are not part of a dormouse \
                     snapshot ({})",
                    names.join(", ")
                ),
            ));
        }
        if !self.has_manifest {
            return Err(refused(
                dir,
                format!("it is not empty and holds no dormouse snapshot (no {MANIFEST_FILE})"),
            ));
        }
        Ok(())
    }
}

/// Deletes the files `contents.ours` lists, then the directory if that left it empty. Anything
/// else that appeared meanwhile is left where it is (with a warning naming it).
pub(crate) fn remove_listed(dir: &Path, contents: &Contents) {
    for name in &contents.ours {
        let path = dir.join(name);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a replaced snapshot file");
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        tracing::warn!(
            dir = %dir.display(),
            error = %e,
            "the replaced snapshot's directory is not empty: files dormouse did not write were \
             left there"
        );
    }
}

/// Whether a snapshot may be written to `dir` under `policy`, checked without writing anything:
/// callers with state that a failed snapshot would lose (a VM's dirty log) check first.
/// [`crate::write_snapshot`] checks again, before writing and when moving the snapshot in place.
pub fn check_snapshot_target(dir: &Path, policy: TargetPolicy) -> Result<()> {
    check_target(dir, policy).map(drop)
}

/// Removes a snapshot directory dormouse wrote: only its snapshot files, then the directory if
/// that emptied it. Other entries are kept and named in the error.
pub fn remove_snapshot_dir(dir: &Path) -> Result<()> {
    let contents = Contents::of(dir, None)?;
    let kept: Vec<PathBuf> = contents.foreign.iter().map(|n| dir.join(n)).collect();
    remove_listed(dir, &contents);
    if !kept.is_empty() {
        return Err(refused(
            dir,
            format!("removed its snapshot files but kept entries dormouse did not write: {kept:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fake_snapshot(dir: &Path, tag: &[u8]) {
        fs::create_dir_all(dir).unwrap();
        for name in [MANIFEST_FILE, STATE_FILE, MEMORY_FILE] {
            fs::write(dir.join(name), tag).unwrap();
        }
    }

    pub(crate) fn entries(dir: &Path) -> Vec<(OsString, Vec<u8>)> {
        let mut out: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name(), fs::read(e.path()).unwrap())
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn removing_a_snapshot_dir_keeps_foreign_entries() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("snap");
        fake_snapshot(&dir, b"x");
        fs::write(dir.join("mine.txt"), b"keep").unwrap();
        assert!(remove_snapshot_dir(&dir).is_err());
        assert_eq!(entries(&dir), [("mine.txt".into(), b"keep".to_vec())]);
        fs::remove_file(dir.join("mine.txt")).unwrap();
        fake_snapshot(&dir, b"x");
        remove_snapshot_dir(&dir).unwrap();
        assert!(!dir.exists());
    }
}
