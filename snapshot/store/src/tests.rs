//! Push, pull and gc against a [`LocalStore`] (the S3 side: tests/tests/store.rs).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;

const MIB: u64 = 1 << 20;

fn options() -> TransferOptions {
    TransferOptions {
        concurrency: 4,
        chunk_size: MIB,
        ..TransferOptions::default()
    }
}

/// A full snapshot directory: a real manifest, a state file, a sparse 12 MiB memory file with
/// data in chunks 0, 2 and 11 (the rest holes), and a companion disk image.
fn make_snapshot(dir: &Path, seed: u8) {
    fs::create_dir_all(dir).unwrap();
    let regions = snapshot::compute_layout(&[(0, 12 * MIB)]).unwrap();
    let manifest = snapshot::Manifest::new(
        snapshot::SnapshotKind::Full,
        None,
        &snapshot::SnapshotMeta::default(),
        regions,
        snapshot::PageCounts {
            total: 12 * MIB / snapshot::PAGE_SIZE,
            written: 0,
            dirty: 0,
        },
    )
    .unwrap();
    snapshot::write_state(dir, &vec![seed; 1000]).unwrap();
    let memory = fs::File::create(dir.join("memory.bin")).unwrap();
    memory.set_len(12 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    memory.write_all_at(&vec![7u8; MIB as usize], 0).unwrap();
    memory.write_all_at(b"chunk two", 2 * MIB + 100).unwrap();
    memory.write_all_at(&[seed; 4096], 11 * MIB).unwrap();
    fs::write(dir.join("disk-0.img"), vec![3u8; 200_000]).unwrap();
    manifest.write(dir).unwrap();
}

fn assert_same_files(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<_> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(a), names(b));
    for name in names(a) {
        assert_eq!(
            fs::read(a.join(&name)).unwrap(),
            fs::read(b.join(&name)).unwrap(),
            "{name:?} differs"
        );
    }
}

fn chunk_objects(root: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<_> = fs::read_dir(root.join("chunks"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn push_then_pull_is_byte_identical_and_sparse() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("snap");
    make_snapshot(&src, 1);
    let store = LocalStore::new(&tmp.path().join("store"), true).unwrap();
    let report = push(&store, &src, "tpl", options(), &NoProgress)
        .await
        .unwrap();
    // memory.bin: chunks 0, 2, 11 hold data, the 9 others are zero; disk-0.img: one chunk.
    assert_eq!((report.chunks, report.zero_chunks), (4, 9), "{report:?}");
    assert_eq!(report.uploaded_chunks, 4);

    let out = tmp.path().join("pulled/snap");
    let manifest = pull(&store, "tpl", &out, options(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(manifest.name, "tpl");
    assert_same_files(&src, &out);
    let memory = fs::metadata(out.join("memory.bin")).unwrap();
    assert!(
        memory.blocks() * 512 < 4 * MIB,
        "holes stay holes: {} bytes allocated",
        memory.blocks() * 512
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(memory.permissions().mode() & 0o777, 0o600);
    // Nothing but the snapshot is left beside it (no staging directory).
    assert_eq!(fs::read_dir(tmp.path().join("pulled")).unwrap().count(), 1);
}

#[tokio::test]
async fn snapshots_share_chunks_and_a_second_push_uploads_only_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = LocalStore::new(&root, true).unwrap();
    let a = tmp.path().join("a");
    make_snapshot(&a, 1);
    push(&store, &a, "a", options(), &NoProgress).await.unwrap();
    let after_a = chunk_objects(&root);

    // b differs from a in state.bin (inline) and memory chunk 11 only.
    let b = tmp.path().join("b");
    make_snapshot(&b, 2);
    let report = push(&store, &b, "b", options(), &NoProgress).await.unwrap();
    assert_eq!(report.uploaded_chunks, 1, "{report:?}");
    let after_b = chunk_objects(&root);
    assert_eq!(after_b.len(), after_a.len() + 1);

    // A chunk older than the reuse age is written again (renewing its age, which gc relies on).
    let c = tmp.path().join("c");
    make_snapshot(&c, 2);
    let renew = TransferOptions {
        reuse_max_age: Duration::ZERO,
        ..options()
    };
    let report = push(&store, &c, "c", renew, &NoProgress).await.unwrap();
    assert_eq!(report.uploaded_chunks, report.chunks, "{report:?}");
    assert_eq!(chunk_objects(&root), after_b);

    // The same name again is refused, and changes nothing.
    let err = push(&store, &b, "a", options(), &NoProgress)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already holds a snapshot named a"), "{err}");
    assert_eq!(chunk_objects(&root), after_b);
}

#[tokio::test]
async fn put_new_writes_only_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = LocalStore::new(tmp.path(), true).unwrap();
    assert!(store.put_new("k/a", "one".into()).await.unwrap());
    assert!(!store.put_new("k/a", "two".into()).await.unwrap());
    assert_eq!(store.get("k/a", 10).await.unwrap(), "one");
}

#[tokio::test]
async fn an_interrupted_push_leaves_no_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("snap");
    make_snapshot(&src, 1);
    let local: Arc<dyn Store> = Arc::new(LocalStore::new(&tmp.path().join("store"), true).unwrap());
    let failing = FailingWrites::new(local.clone(), 2);
    let err = push(&failing, &src, "s", options(), &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Injected), "{err}");
    assert!(
        !local.list("chunks/").await.unwrap().is_empty(),
        "some chunks were written"
    );
    assert!(local.list("snapshots/").await.unwrap().is_empty());
    let err = read_manifest(local.as_ref(), "s").await.unwrap_err();
    assert!(matches!(err, StoreError::NoSuchSnapshot { .. }), "{err}");
    // The next push completes, reusing what the first one wrote.
    let report = push(local.as_ref(), &src, "s", options(), &NoProgress)
        .await
        .unwrap();
    assert!(report.uploaded_chunks < report.chunks, "{report:?}");
}

#[tokio::test]
async fn a_damaged_or_missing_chunk_fails_the_pull_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let src = tmp.path().join("snap");
    make_snapshot(&src, 1);
    let store = LocalStore::new(&root, true).unwrap();
    push(&store, &src, "s", options(), &NoProgress)
        .await
        .unwrap();
    let manifest = read_manifest(&store, "s").await.unwrap();
    let hash = manifest.chunk_hashes().next().unwrap().to_string();
    let path = root.join("chunks").join(&hash);
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&path, &bytes).unwrap();

    let out = tmp.path().join("out");
    let err = pull(&store, "s", &out, options(), &NoProgress)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&hash) && err.contains("corrupt"), "{err}");
    assert!(!out.exists());
    assert_eq!(
        fs::read_dir(tmp.path()).unwrap().count(),
        2,
        "no staging left"
    );

    fs::remove_file(&path).unwrap();
    let err = pull(&store, "s", &out, options(), &NoProgress)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&hash) && err.contains("missing"), "{err}");
}

#[tokio::test]
async fn pull_never_writes_into_user_data() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("snap");
    make_snapshot(&src, 1);
    let store = LocalStore::new(&tmp.path().join("store"), true).unwrap();
    push(&store, &src, "s", options(), &NoProgress)
        .await
        .unwrap();
    let out = tmp.path().join("home");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("notes.txt"), b"mine").unwrap();
    let err = pull(&store, "s", &out, options(), &NoProgress)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("notes.txt"), "{err}");
    assert_eq!(fs::read_dir(&out).unwrap().count(), 1);
    // An empty directory is fine.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    pull(&store, "s", &empty, options(), &NoProgress)
        .await
        .unwrap();
    assert_same_files(&src, &empty);
}

#[tokio::test]
async fn gc_deletes_only_unreferenced_chunks_past_the_grace() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = LocalStore::new(&root, true).unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    make_snapshot(&a, 1);
    make_snapshot(&b, 2);
    push(&store, &a, "a", options(), &NoProgress).await.unwrap();
    push(&store, &b, "b", options(), &NoProgress).await.unwrap();
    let before = chunk_objects(&root);
    let only_b: Vec<String> = {
        let a_chunks: Vec<String> = read_manifest(&store, "a")
            .await
            .unwrap()
            .chunk_hashes()
            .map(str::to_string)
            .collect();
        read_manifest(&store, "b")
            .await
            .unwrap()
            .chunk_hashes()
            .filter(|h| !a_chunks.iter().any(|a| a == h))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(only_b.len(), 1);
    // Drop snapshot b; its chunk is now garbage, but young.
    store.delete(&manifest_key("b")).await.unwrap();
    let report = gc(&store, Duration::from_secs(3600), 4).await.unwrap();
    assert_eq!((report.deleted, report.kept_young), (0, 1), "{report:?}");
    assert_eq!(chunk_objects(&root), before);

    let report = gc(&store, Duration::ZERO, 4).await.unwrap();
    assert_eq!(report.deleted, 1, "{report:?}");
    let after = chunk_objects(&root);
    assert_eq!(after.len(), before.len() - 1);
    assert!(!after.iter().any(|(name, _)| *name == only_b[0]));
    // a is whole.
    let out = tmp.path().join("out");
    pull(&store, "a", &out, options(), &NoProgress)
        .await
        .unwrap();
    assert_same_files(&a, &out);
}

#[tokio::test]
async fn a_diff_snapshot_is_pushed_as_its_merged_full_view() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    make_snapshot(&base, 1);
    // A diff child: one page of chunk 5 changed (bitmap names it), parent is the base.
    let child = tmp.path().join("child");
    fs::create_dir(&child).unwrap();
    let pages = 12 * MIB / snapshot::PAGE_SIZE;
    let parent = snapshot::Manifest::read(&base).unwrap();
    let mut bitmap = snapshot::PageBitmap::new(pages);
    bitmap.set(5 * MIB / snapshot::PAGE_SIZE);
    fs::write(child.join(snapshot::BITMAP_FILE), bitmap.encode()).unwrap();
    let memory = fs::File::create(child.join("memory.bin")).unwrap();
    memory.set_len(12 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    memory.write_all_at(&[9u8; 4096], 5 * MIB).unwrap();
    fs::copy(base.join("state.bin"), child.join("state.bin")).unwrap();
    let manifest = snapshot::Manifest::new(
        snapshot::SnapshotKind::Diff,
        Some(snapshot::ParentRef {
            dir: "../base".into(),
            id: parent.snapshot_id.clone(),
        }),
        &snapshot::SnapshotMeta::default(),
        parent.regions.clone(),
        snapshot::PageCounts {
            total: pages,
            written: 1,
            dirty: 1,
        },
    )
    .unwrap();
    manifest.write(&child).unwrap();

    let store = LocalStore::new(&tmp.path().join("store"), true).unwrap();
    push(&store, &base, "base", options(), &NoProgress)
        .await
        .unwrap();
    let report = push(&store, &child, "child", options(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(report.uploaded_chunks, 1, "only chunk 5 is new: {report:?}");
    let out = tmp.path().join("out");
    pull(&store, "child", &out, options(), &NoProgress)
        .await
        .unwrap();
    let pulled = snapshot::Manifest::read(&out).unwrap();
    assert_eq!(pulled.kind, snapshot::SnapshotKind::Full);
    assert!(!out.join(snapshot::BITMAP_FILE).exists());
    let mut expected = fs::read(base.join("memory.bin")).unwrap();
    expected[5 * MIB as usize..5 * MIB as usize + 4096].fill(9);
    assert_eq!(fs::read(out.join("memory.bin")).unwrap(), expected);
}
