//! Templates from a snapshot store: [`fetch_template`] pulls a checkpoint pushed with
//! `dormouse snapshot push` (or `snapshot_store::push`) into a local cache once, for
//! `SandboxConfig::template`. Every sandbox created from it then shares the one local copy
//! (its memory file's page cache, too).

use std::path::{Path, PathBuf};

use crate::error::{Result, SandboxError};

/// Pulls the template at `url` (`file:///abs/store/NAME`, `s3://bucket/prefix/NAME`; S3
/// settings from the `AWS_*` variables) into `cache_dir/NAME-<snapshot id>` unless it is
/// already there, and returns that directory. The snapshot id in the name means a template
/// pushed again under a new name never reuses a stale copy; concurrent calls for one template
/// pull it once each at most and agree on the result.
pub async fn fetch_template(url: &str, cache_dir: &Path) -> Result<PathBuf> {
    let url = snapshot_store::SnapshotUrl::parse(url)?;
    let store = snapshot_store::open_store(&url.store, snapshot_store::Access::Read)?;
    let manifest = snapshot_store::read_manifest(store.as_ref(), &url.name).await?;
    // The id comes from the store: use it in a path only if it is a plain name.
    if !snapshot_store::valid_name(&manifest.snapshot_id) {
        return Err(SandboxError::InvalidConfig(format!(
            "template {url}: snapshot id {:?} is not a plain name",
            manifest.snapshot_id
        )));
    }
    let dir = cache_dir.join(format!("{}-{}", url.name, manifest.snapshot_id));
    if snapshot::Manifest::read(&dir).is_ok() {
        tracing::debug!(template = %url, dir = %dir.display(), "template already cached");
        return Ok(dir);
    }
    let started = std::time::Instant::now();
    let pulled = snapshot_store::pull(
        store.as_ref(),
        &url.name,
        &dir,
        snapshot_store::TransferOptions::default(),
        &snapshot_store::NoProgress,
    )
    .await;
    match pulled {
        Ok(_) => {
            tracing::info!(template = %url, dir = %dir.display(), secs = started.elapsed().as_secs_f64(), "template pulled");
            Ok(dir)
        }
        // Another caller installed it meanwhile.
        Err(_) if snapshot::Manifest::read(&dir).is_ok() => Ok(dir),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid snapshot directory (no VM needed to move it around).
    fn fake_checkpoint(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let size = 8 << 20;
        let manifest = snapshot::Manifest::new(
            snapshot::SnapshotKind::Full,
            None,
            &snapshot::SnapshotMeta::default(),
            snapshot::compute_layout(&[(0, size)]).unwrap(),
            snapshot::PageCounts {
                total: size / snapshot::PAGE_SIZE,
                written: 1,
                dirty: 0,
            },
        )
        .unwrap();
        snapshot::write_state(dir, &vec![1u8; 10]).unwrap();
        let memory = std::fs::File::create(dir.join("memory.bin")).unwrap();
        memory.set_len(size).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&memory, &[5u8; 4096], 4096).unwrap();
        std::fs::write(dir.join("disk-0.img"), vec![2u8; 100_000]).unwrap();
        manifest.write(dir).unwrap();
    }

    #[tokio::test]
    async fn a_template_is_pulled_once_into_the_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("ckpt");
        fake_checkpoint(&src);
        let root = tmp.path().join("store");
        let store = snapshot_store::LocalStore::new(&root, true).unwrap();
        snapshot_store::push(
            &store,
            &src,
            "tpl",
            snapshot_store::TransferOptions::default(),
            &snapshot_store::NoProgress,
        )
        .await
        .unwrap();
        let url = format!("file://{}/tpl", root.display());
        let cache = tmp.path().join("cache");
        let dir = fetch_template(&url, &cache).await.unwrap();
        let id = snapshot::Manifest::read(&src).unwrap().snapshot_id;
        assert_eq!(dir, cache.join(format!("tpl-{id}")));
        for name in ["memory.bin", "disk-0.img", "state.bin", "manifest.json"] {
            assert_eq!(
                std::fs::read(dir.join(name)).unwrap(),
                std::fs::read(src.join(name)).unwrap(),
                "{name}"
            );
        }
        // The second call is served from the cache: it works without the store's chunks.
        std::fs::remove_dir_all(root.join("chunks")).unwrap();
        assert_eq!(fetch_template(&url, &cache).await.unwrap(), dir);
        // A missing template is an error naming it.
        let err = fetch_template(&format!("file://{}/nope", root.display()), &cache)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("snapshot nope not found"), "{err}");
    }
}
