//! The staging directory a snapshot is assembled in and its installation at the target: the
//! only code that moves a snapshot into place or swaps out one it replaces, under the rules of
//! [`crate::target`].

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{io_err, Result};
use crate::fsutil::{exchange, fsync_dir, parent_dir, temp_sibling, DIR_MODE};
use crate::target::{check_target, refused, remove_listed, Contents, TargetKind, TargetPolicy};

/// A fresh, empty directory (0700) next to `final_dir` where a snapshot is assembled before it
/// is moved into place; removed on drop unless installed. Creating it first checks that
/// `final_dir` is a place the policy allows (see [`crate::target`]), so a refused target costs
/// nothing.
pub(crate) struct StagingDir {
    path: PathBuf,
    policy: TargetPolicy,
    /// `path` is no longer our staging directory (installed, or it now holds the replaced
    /// snapshot's directory, which is not ours to `remove_dir_all`).
    released: bool,
}

impl StagingDir {
    pub(crate) fn create(final_dir: &Path, policy: TargetPolicy) -> Result<Self> {
        check_target(final_dir, policy)?;
        let path = temp_sibling(final_dir)?;
        fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(&path)
            .map_err(io_err("create staging directory", &path))?;
        let staging = Self {
            path,
            policy,
            released: false,
        };
        // The umask may have narrowed the mode; 0700 exactly, whatever it is.
        fs::set_permissions(&staging.path, fs::Permissions::from_mode(DIR_MODE))
            .map_err(io_err("set mode 0700 on", &staging.path))?;
        Ok(staging)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the staged snapshot to `final_dir`, checking the target again: it may have changed
    /// while the snapshot was written. A missing target or an empty directory is replaced by
    /// `rename(2)`, which the kernel refuses for anything but an empty directory. An existing
    /// snapshot (when the policy allows replacing it) is swapped out atomically
    /// (`RENAME_EXCHANGE`) and then only its own files are deleted; files a live VM still maps
    /// stay valid because unlinking never changes an open inode's contents.
    pub(crate) fn install(mut self, final_dir: &Path, sync: bool) -> Result<()> {
        if sync {
            fsync_dir(&self.path)?;
        }
        match check_target(final_dir, self.policy)? {
            TargetKind::Missing | TargetKind::EmptyDir => {
                fs::rename(&self.path, final_dir).map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOTEMPTY | libc::EEXIST | libc::ENOTDIR | libc::EISDIR) => refused(
                        final_dir,
                        "it changed while the snapshot was written and is no longer \
                             missing or empty; it was left as it is",
                    ),
                    _ => io_err("rename snapshot into place", final_dir)(e),
                })?;
                self.released = true;
            }
            TargetKind::Snapshot => self.replace(final_dir)?,
        }
        if sync {
            fsync_dir(parent_dir(final_dir))?;
        }
        Ok(())
    }

    /// The swap of [`Self::install`] for a target already checked to hold a snapshot.
    pub(crate) fn replace(&mut self, final_dir: &Path) -> Result<()> {
        exchange(&self.path, final_dir)?;
        // `self.path` now names the caller's old directory.
        self.released = true;
        let old = match Contents::of(&self.path, self.policy.companions) {
            Ok(old) if old.refusal(&self.path).is_ok() => old,
            outcome => {
                // Something that is not a snapshot's appeared since the check: put everything
                // back as it was and keep our new snapshot for drop() to remove.
                exchange(&self.path, final_dir)?;
                self.released = false;
                outcome?;
                return Err(refused(
                    final_dir,
                    "it changed while the snapshot was written and now holds entries that are \
                     not part of a dormouse snapshot; it was left as it was",
                ));
            }
        };
        remove_listed(&self.path, &old);
        Ok(())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.released {
            // Our own staging directory: nothing but what this process wrote is in it.
            if let Err(e) = fs::remove_dir_all(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove staging directory");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::tests::{entries, fake_snapshot};
    use crate::SnapshotError;

    const REPLACE: TargetPolicy = TargetPolicy {
        replace: true,
        companions: None,
    };

    /// A file that appears in the old snapshot's directory after the check: the swap is undone,
    /// the directory is exactly as it was, and no staging directory is left.
    #[test]
    fn a_file_appearing_before_a_replace_undoes_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("snap");
        fake_snapshot(&dir, b"old");
        let staging = StagingDir::create(&dir, REPLACE).unwrap();
        fake_snapshot(staging.path(), b"new");
        fs::write(dir.join("late.txt"), b"user data").unwrap();
        let before = entries(&dir);
        // Seen by the check at install time: refused before any swap.
        let error = staging.install(&dir, false).unwrap_err();
        assert!(
            matches!(&error, SnapshotError::TargetRefused { reason, .. } if reason.contains("late.txt")),
            "{error}"
        );
        assert_eq!(entries(&dir), before);
        assert_eq!(
            fs::read_dir(root.path()).unwrap().count(),
            1,
            "staging left"
        );

        // Appearing after that check (the swap itself is called directly here): undone.
        fs::remove_file(dir.join("late.txt")).unwrap();
        let mut staging = StagingDir::create(&dir, REPLACE).unwrap();
        fake_snapshot(staging.path(), b"new");
        fs::write(dir.join("late.txt"), b"user data").unwrap();
        let error = staging.replace(&dir).unwrap_err();
        assert!(
            matches!(&error, SnapshotError::TargetRefused { reason, .. } if reason.contains("changed")),
            "{error}"
        );
        drop(staging);
        assert_eq!(entries(&dir), before);
        assert_eq!(
            fs::read_dir(root.path()).unwrap().count(),
            1,
            "staging left"
        );
    }

    #[test]
    fn a_file_appearing_in_an_empty_target_keeps_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("empty");
        fs::create_dir(&dir).unwrap();
        let staging = StagingDir::create(&dir, TargetPolicy::default()).unwrap();
        fake_snapshot(staging.path(), b"new");
        fs::write(dir.join("late.txt"), b"user data").unwrap();
        assert!(matches!(
            staging.install(&dir, false),
            Err(SnapshotError::TargetRefused { .. })
        ));
        assert_eq!(entries(&dir), [("late.txt".into(), b"user data".to_vec())]);
        assert_eq!(
            fs::read_dir(root.path()).unwrap().count(),
            1,
            "staging left"
        );
    }

    #[test]
    fn a_file_appearing_at_a_missing_target_keeps_it() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("missing");
        let staging = StagingDir::create(&path, TargetPolicy::default()).unwrap();
        fake_snapshot(staging.path(), b"new");
        fs::write(&path, b"a file now").unwrap();
        assert!(matches!(
            staging.install(&path, false),
            Err(SnapshotError::TargetRefused { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), b"a file now");
    }
}
