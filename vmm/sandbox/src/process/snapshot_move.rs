//! Moving a snapshot a sandbox process wrote into its staging directory to where the caller
//! asked, under the same target rules as an in-process snapshot (`snapshot::TargetPolicy`): a
//! refused target loses nothing, replacing deletes only a snapshot's (and a checkpoint's) own
//! files. Files are renamed, or copied (reflink or sparse) across file systems.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use snapshot::{check_snapshot_target, SnapshotError, TargetPolicy, SNAPSHOT_FILES};

use crate::disk_copy::clone_or_copy;

#[derive(Debug, thiserror::Error)]
pub(crate) enum MoveError {
    #[error(transparent)]
    Target(#[from] SnapshotError),
    #[error("moving {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MoveError + 'a {
    move |source| MoveError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn ours(name: &OsStr, policy: TargetPolicy) -> bool {
    SNAPSHOT_FILES.iter().any(|f| name == OsStr::new(f))
        || policy
            .companions
            .is_some_and(|is_companion| is_companion(name))
}

fn move_file(from: &Path, to: &Path, owner: Option<(u32, u32)>) -> Result<(), MoveError> {
    match fs::rename(from, to) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            clone_or_copy(from, to).map_err(io_err("copying", to))?;
            fs::remove_file(from).map_err(io_err("removing", from))?;
        }
        Err(e) => return Err(io_err("renaming", from)(e)),
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(to, Some(uid), Some(gid)).map_err(io_err("chown", to))?;
    }
    Ok(())
}

/// Moves every file of `staging` into `target` (checked against `policy` first), then removes
/// `staging`. `owner`: chown the moved files (a jailed process wrote them as its own uid).
pub(crate) fn install(
    staging: &Path,
    target: &Path,
    policy: TargetPolicy,
    owner: Option<(u32, u32)>,
) -> Result<(), MoveError> {
    check_snapshot_target(target, policy)?;
    match fs::symlink_metadata(target) {
        Ok(_) => {
            // An empty directory, or a snapshot the caller lets us replace: its own files go.
            for entry in fs::read_dir(target).map_err(io_err("listing", target))? {
                let entry = entry.map_err(io_err("listing", target))?;
                let regular = entry.file_type().is_ok_and(|t| t.is_file());
                if regular && ours(&entry.file_name(), policy) {
                    let path = entry.path();
                    // Unlinked, never truncated: a VM woken from it may still map memory.bin.
                    fs::remove_file(&path).map_err(io_err("removing", &path))?;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Like an in-process snapshot: the parent must exist.
            fs::DirBuilder::new()
                .mode(0o700)
                .create(target)
                .map_err(io_err("creating", target))?;
        }
        Err(e) => return Err(io_err("inspecting", target)(e)),
    }
    for entry in fs::read_dir(staging).map_err(io_err("listing", staging))? {
        let entry = entry.map_err(io_err("listing", staging))?;
        move_file(&entry.path(), &target.join(entry.file_name()), owner)?;
    }
    if owner.is_some() {
        let _ = fs::set_permissions(target, fs::Permissions::from_mode(0o700));
    }
    fs::remove_dir(staging).map_err(io_err("removing", staging))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_snapshot(dir: &Path, tag: &str) {
        fs::create_dir_all(dir).unwrap();
        for name in ["manifest.json", "state.bin", "memory.bin"] {
            fs::write(dir.join(name), tag).unwrap();
        }
    }

    fn companion(name: &OsStr) -> bool {
        name == "sandbox.json"
    }

    #[test]
    fn into_a_missing_or_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        fake_snapshot(&staging, "new");
        let target = dir.path().join("a");
        install(&staging, &target, TargetPolicy::default(), None).unwrap();
        assert_eq!(fs::read_to_string(target.join("state.bin")).unwrap(), "new");
        assert!(!staging.exists());

        fake_snapshot(&staging, "again");
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        install(&staging, &empty, TargetPolicy::default(), None).unwrap();
        assert_eq!(
            fs::read_to_string(empty.join("memory.bin")).unwrap(),
            "again"
        );
    }

    #[test]
    fn refused_targets_lose_nothing_and_replace_keeps_foreign_rules() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        let target = dir.path().join("t");
        fake_snapshot(&target, "old");
        fs::write(target.join("sandbox.json"), "old").unwrap();
        fake_snapshot(&staging, "new");
        // Without replace: refused, both untouched.
        let err = install(&staging, &target, TargetPolicy::default(), None).unwrap_err();
        assert!(
            matches!(err, MoveError::Target(SnapshotError::TargetRefused { .. })),
            "{err}"
        );
        assert_eq!(fs::read_to_string(target.join("state.bin")).unwrap(), "old");
        assert!(staging.join("state.bin").exists());
        // Replace with the companion rule: the old checkpoint's files go, the new ones come.
        let policy = TargetPolicy {
            replace: true,
            companions: Some(companion),
        };
        install(&staging, &target, policy, None).unwrap();
        assert_eq!(fs::read_to_string(target.join("state.bin")).unwrap(), "new");
        assert!(!target.join("sandbox.json").exists());

        // A directory with a foreign file is refused even with replace.
        fake_snapshot(&staging, "third");
        fs::write(target.join("notes.txt"), "mine").unwrap();
        assert!(install(&staging, &target, policy, None).is_err());
        assert_eq!(
            fs::read_to_string(target.join("notes.txt")).unwrap(),
            "mine"
        );
        assert_eq!(fs::read_to_string(target.join("state.bin")).unwrap(), "new");
    }
}
