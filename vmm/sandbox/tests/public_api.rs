//! What a worker names from `vmm_sandbox` alone: the types its calls return.

use std::time::UNIX_EPOCH;

use vmm_sandbox::{FileInfo, FileKind, MemoryStorage, SnapshotOutcome, WriteOptions};

/// What a worker would write about a hibernate or checkpoint result.
fn describe(outcome: &SnapshotOutcome) -> String {
    let memory = match outcome.memory {
        MemoryStorage::Linked => "linked",
        MemoryStorage::Written => "written",
    };
    format!(
        "{} ({memory}, {} pages)",
        outcome.dir.display(),
        outcome.pages_written
    )
}

#[test]
fn snapshot_results_are_nameable_from_the_library() {
    let outcome = SnapshotOutcome {
        dir: "/srv/cp".into(),
        diff: false,
        snapshot_id: "s".into(),
        parent_id: None,
        pages_written: 3,
        memory: MemoryStorage::Linked,
        duration: std::time::Duration::ZERO,
        paused: std::time::Duration::ZERO,
        live: false,
        live_unavailable: None,
        state: None,
    };
    assert_eq!(describe(&outcome), "/srv/cp (linked, 3 pages)");
}

#[test]
fn file_info_is_plain_rust_and_writes_create_parents() {
    let info = FileInfo {
        path: "/work/a".into(),
        name: "a".into(),
        kind: FileKind::Dir,
        size: 0,
        mode: 0o755,
        uid: 0,
        gid: 0,
        modified: UNIX_EPOCH,
        symlink_target: None,
    };
    assert!(info.is_dir() && !info.is_file());
    assert!(WriteOptions::default().create_parents);
    assert!(!WriteOptions::default().append);
}
