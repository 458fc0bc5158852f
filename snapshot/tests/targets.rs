//! Where a snapshot may be written: missing paths and empty directories, an existing snapshot
//! only when replacing, nothing else; and nothing but snapshot files is ever deleted.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use snapshot::{
    merge_chain, write_snapshot, Manifest, MemorySource, PageSelection, SnapshotError,
    WriteOptions, MEMORY_FILE, SNAPSHOT_FILES,
};

fn take(dir: &Path, options: &WriteOptions<'_>) -> Result<Manifest, SnapshotError> {
    let memory = guest_memory(1 << 20, 1 << 20);
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let mut dirty = empty_dirty(source.layout());
    touch_page(&memory, &mut dirty, 0, 0, 3, 1);
    write_snapshot(
        dir,
        &sample_state(),
        &source,
        PageSelection::Dirty(&dirty),
        &meta(),
        options,
    )
}

fn plain() -> WriteOptions<'static> {
    WriteOptions::default()
}

fn replacing() -> WriteOptions<'static> {
    WriteOptions {
        replace: true,
        ..WriteOptions::default()
    }
}

/// Every entry of `dir` (recursively) with its bytes, to compare before and after.
fn tree(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
    names.sort_by_key(|e| e.file_name());
    for entry in names {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            out.push((path.clone(), None));
            out.extend(tree(&path));
        } else if kind.is_symlink() {
            out.push((
                path.clone(),
                Some(
                    fs::read_link(&path)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                ),
            ));
        } else {
            out.push((path.clone(), Some(fs::read(&path).unwrap())));
        }
    }
    out
}

/// The parent directory holds no leftover staging directory.
fn no_staging_left(parent: &Path) {
    let left: Vec<_> = fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "staging left behind: {left:?}");
}

fn assert_refused(result: Result<Manifest, SnapshotError>, path: &Path, reason_part: &str) {
    match result {
        Err(SnapshotError::TargetRefused { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(reason.contains(reason_part), "{reason}");
            let message = SnapshotError::TargetRefused { path: p, reason }.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_missing_path_is_created() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("snap");
    take(&dir, &plain()).unwrap();
    assert!(Manifest::read(&dir).is_ok());
    no_staging_left(root.path());
}

#[test]
fn an_empty_directory_is_used() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("snap");
    fs::create_dir(&dir).unwrap();
    take(&dir, &plain()).unwrap();
    assert!(dir.join(MEMORY_FILE).is_file());
    no_staging_left(root.path());
}

#[test]
fn a_directory_with_unrelated_files_is_refused_and_left_byte_identical() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("notes.txt"), b"precious").unwrap();
    fs::write(dir.join("sub/deep.bin"), [7u8; 10_000]).unwrap();
    // Named like snapshot files, but not a snapshot's: still someone else's.
    fs::write(dir.join("memory.bin"), b"not guest memory").unwrap();
    let before = tree(root.path());
    for options in [plain(), replacing()] {
        assert_refused(take(&dir, &options), &dir, "notes.txt");
        assert_eq!(tree(root.path()), before, "replace: {}", options.replace);
    }
}

#[test]
fn files_named_like_a_snapshot_without_a_manifest_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("memory.bin"), b"someone's file").unwrap();
    let before = tree(root.path());
    assert_refused(take(&dir, &replacing()), &dir, "no manifest.json");
    assert_eq!(tree(root.path()), before);
}

#[test]
fn a_snapshot_is_replaced_only_when_asked() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("snap");
    let first = take(&dir, &plain()).unwrap();
    let before = tree(root.path());
    assert_refused(take(&dir, &plain()), &dir, "replace");
    assert_eq!(tree(root.path()), before);
    let old_inode = fs::metadata(dir.join(MEMORY_FILE)).unwrap().ino();

    let second = take(&dir, &replacing()).unwrap();
    assert_ne!(first.snapshot_id, second.snapshot_id);
    assert_eq!(
        Manifest::read(&dir).unwrap().snapshot_id,
        second.snapshot_id
    );
    assert_ne!(
        fs::metadata(dir.join(MEMORY_FILE)).unwrap().ino(),
        old_inode
    );
    // Only the new snapshot's files, no old ones and no staging directory next to it.
    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["manifest.json", "memory.bin", "state.bin"]);
    let siblings: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(siblings, ["snap"]);
}

#[test]
fn a_snapshot_plus_a_user_file_is_refused_even_with_replace() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("snap");
    take(&dir, &plain()).unwrap();
    fs::write(dir.join("README"), b"mine").unwrap();
    let before = tree(root.path());
    assert_refused(take(&dir, &replacing()), &dir, "README");
    assert_eq!(tree(root.path()), before);
    no_staging_left(root.path());
}

#[test]
fn declared_companion_files_are_replaced_with_the_snapshot() {
    fn disk_copy(name: &OsStr) -> bool {
        name == "disk-0.img"
    }
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("checkpoint");
    take(&dir, &plain()).unwrap();
    fs::write(dir.join("disk-0.img"), b"old disk").unwrap();
    let with_companions = WriteOptions {
        replace: true,
        companions: Some(disk_copy),
        ..WriteOptions::default()
    };
    take(&dir, &with_companions).unwrap();
    assert!(!dir.join("disk-0.img").exists());
    // Without the declaration the same file is someone else's.
    fs::write(dir.join("disk-0.img"), b"old disk").unwrap();
    assert_refused(take(&dir, &replacing()), &dir, "disk-0.img");
}

#[test]
fn a_symlink_is_refused_and_its_target_untouched() {
    let root = tempfile::tempdir().unwrap();
    let real = root.path().join("real");
    take(&real, &plain()).unwrap();
    let empty = root.path().join("empty");
    fs::create_dir(&empty).unwrap();
    for target in [&real, &empty] {
        let link = root.path().join("link");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link).unwrap();
        let before = tree(root.path());
        for options in [plain(), replacing()] {
            assert_refused(take(&link, &options), &link, "symbolic link");
            assert_eq!(tree(root.path()), before);
            // A trailing slash does not look through the link.
            let slashed = PathBuf::from(format!("{}/", link.display()));
            assert!(matches!(
                take(&slashed, &options),
                Err(SnapshotError::TargetRefused { .. })
            ));
            assert_eq!(tree(root.path()), before);
        }
    }
}

#[test]
fn a_regular_file_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("file");
    fs::write(&file, b"contents").unwrap();
    for options in [plain(), replacing()] {
        assert_refused(take(&file, &options), &file, "regular file");
        assert_eq!(fs::read(&file).unwrap(), b"contents");
    }
    no_staging_left(root.path());
}

#[test]
fn merge_follows_the_same_rules() {
    let root = tempfile::tempdir().unwrap();
    let snap = root.path().join("snap");
    take(&snap, &plain()).unwrap();
    let out = root.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep"), b"k").unwrap();
    assert!(matches!(
        merge_chain(&snap, &out, true),
        Err(SnapshotError::TargetRefused { .. })
    ));
    assert_eq!(fs::read(out.join("keep")).unwrap(), b"k");
    assert!(matches!(
        merge_chain(&snap, &snap, false),
        Err(SnapshotError::TargetRefused { .. })
    ));
    merge_chain(&snap, &snap, true).unwrap();
    let fresh = root.path().join("fresh");
    merge_chain(&snap, &fresh, false).unwrap();
    assert_modes(&fresh);
}

fn assert_modes(dir: &Path) {
    let mode = fs::metadata(dir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "{}", dir.display());
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        assert!(
            SNAPSHOT_FILES.iter().any(|f| name == OsStr::new(f)),
            "{name:?}"
        );
        let mode = entry.metadata().unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600, "{}", entry.path().display());
    }
}

/// Run in a child process: the umask is per process and other tests run in parallel threads.
#[test]
fn modes_are_private_whatever_the_umask() {
    const CHILD: &str = "DORMOUSE_TEST_UMASK_CHILD";
    if let Some(dir) = std::env::var_os(CHILD) {
        let dir = PathBuf::from(dir);
        // SAFETY: umask only changes this (child) process's file creation mask.
        unsafe { libc::umask(0) };
        take(&dir.join("snap"), &plain()).unwrap();
        take(&dir.join("snap"), &replacing()).unwrap();
        fs::create_dir(dir.join("empty")).unwrap();
        take(&dir.join("empty"), &plain()).unwrap();
        merge_chain(&dir.join("snap"), &dir.join("merged"), false).unwrap();
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "modes_are_private_whatever_the_umask",
            "--test-threads",
            "1",
        ])
        .env(CHILD, root.path())
        .status()
        .unwrap();
    assert!(status.success());
    for name in ["snap", "empty", "merged"] {
        assert_modes(&root.path().join(name));
    }
}
