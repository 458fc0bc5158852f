use super::*;
use crate::error::SandboxError;

/// A snapshot directory with a real saved state (a Linux guest's devices, from the format
/// corpus); memory is not needed to plan.
fn template_in(parent: &Path, name: &str) -> PathBuf {
    let corpus =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/snapshot-corpus/v2/linux-devices");
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for file in [snapshot::MANIFEST_FILE, snapshot::STATE_FILE] {
        std::fs::copy(corpus.join(file), dir.join(file)).unwrap();
    }
    dir
}

/// Replaces `dir/name` as a snapshot writer does: a new file renamed over the old one.
fn replace_file(dir: &Path, name: &str, contents: &[u8]) {
    let staged = dir.join(format!(".{name}.new"));
    std::fs::write(&staged, contents).unwrap();
    std::fs::rename(&staged, dir.join(name)).unwrap();
}

#[test]
fn a_template_is_decoded_once_while_its_files_stay_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = template_in(tmp.path(), "t");
    let cache = TemplateCache::default();
    let first = cache.get(&dir).unwrap();
    let again = cache.get(&dir).unwrap();
    assert!(Arc::ptr_eq(&first.state, &again.state), "decoded twice");
    assert_eq!(first.layout.vcpus, again.layout.vcpus);
    assert_eq!(first.layout.nets, again.layout.nets);
    assert_eq!(
        first.layout.vcpus,
        first.state.state().vcpu_count,
        "the layout is the state's"
    );
    assert_eq!(cache.len(), 1);
}

#[test]
fn a_replaced_or_rewritten_file_is_read_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = template_in(tmp.path(), "t");
    let cache = TemplateCache::default();
    let first = cache.get(&dir).unwrap();

    // The same bytes under a new inode: read again (and equal).
    let state = std::fs::read(dir.join(snapshot::STATE_FILE)).unwrap();
    replace_file(&dir, snapshot::STATE_FILE, &state);
    let second = cache.get(&dir).unwrap();
    assert!(
        !Arc::ptr_eq(&first.state, &second.state),
        "a stale entry was used"
    );
    assert_eq!(second.layout.vcpus, first.layout.vcpus);

    // A damaged state is an error, never the cached one.
    replace_file(&dir, snapshot::STATE_FILE, b"not a state");
    let err = cache
        .get(&dir)
        .err()
        .expect("a damaged state was planned from");
    assert!(matches!(err, SandboxError::BadCheckpoint { .. }), "{err}");

    // A `sandbox.json` that appears is read (here: one this build refuses).
    replace_file(&dir, snapshot::STATE_FILE, &state);
    cache.get(&dir).unwrap();
    std::fs::write(dir.join(SANDBOX_FILE), br#"{"version": 99, "disks": []}"#).unwrap();
    let err = cache.get(&dir).err().expect("sandbox.json was not read");
    assert!(err.to_string().contains("version 99"), "{err}");
}

#[test]
fn a_missing_template_is_a_clean_error_and_not_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = TemplateCache::default();
    let err = cache
        .get(&tmp.path().join("nothing-here"))
        .err()
        .expect("planned from nothing");
    assert!(matches!(err, SandboxError::BadCheckpoint { .. }), "{err}");
    assert_eq!(cache.len(), 0);
}

#[test]
fn the_cache_keeps_a_bounded_number_of_templates() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = TemplateCache::default();
    let dirs: Vec<PathBuf> = (0..=MAX_TEMPLATES)
        .map(|i| template_in(tmp.path(), &format!("t{i}")))
        .collect();
    for dir in &dirs {
        cache.get(dir).unwrap();
    }
    assert_eq!(cache.len(), MAX_TEMPLATES);
    // The oldest went; the newest is kept.
    let newest = cache.get(&dirs[MAX_TEMPLATES]).unwrap();
    assert!(Arc::ptr_eq(
        &newest.state,
        &cache.get(&dirs[MAX_TEMPLATES]).unwrap().state
    ));
    assert!(!cache.lock().by_dir.contains_key(&dirs[0]));
}
