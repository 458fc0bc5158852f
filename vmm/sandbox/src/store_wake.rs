//! Sandboxes and snapshot stores: a checkpoint brought from a store for a new sandbox (lazily
//! in-process: memory on first touch through userfaultfd; downloaded first for a sandbox
//! process), and a hibernated sandbox's checkpoint pushed to one.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use snapshot_store::{Access, ChunkCache, PushReport, SnapshotUrl, TransferOptions};
use vmm::seccomp::SeccompLevel;
use vmm::LazyRestore;

use crate::error::{Result, SandboxError};

/// A checkpoint from a store, in a local directory: complete, or without its memory, which
/// `lazy` then serves.
pub(crate) struct FetchedCheckpoint {
    pub lazy: Option<LazyRestore>,
}

/// The store client's runtime for lazy fetches: one per process, its threads filtered as store
/// fetchers at the level of the first manager that needed it.
fn fetch_runtime(seccomp: SeccompLevel) -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = snapshot_store::fetch_runtime(vmm::seccomp::store_fetch_hook(seccomp))
        .map_err(|e| SandboxError::io("starting", Path::new("the store client runtime"), e))?;
    // Another caller may have won the race: its runtime is the one.
    Ok(RUNTIME.get_or_init(|| runtime))
}

/// Brings the checkpoint at `url` into `dir` (missing or empty). With `lazy_cache` (the chunk
/// cache's directory; and userfaultfd available) every file but the memory is fetched and the
/// memory comes on demand, through that cache; otherwise the whole checkpoint is downloaded.
pub(crate) async fn fetch_checkpoint(
    url: &str,
    dir: &Path,
    lazy_cache: Option<&Path>,
    seccomp: SeccompLevel,
) -> Result<FetchedCheckpoint> {
    let url = SnapshotUrl::parse(url)?;
    let cache_dir = lazy_cache.map(Path::to_path_buf);
    let lazy = cache_dir.is_some()
        && match snapshot::Userfaultfd::new() {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(
                    "userfaultfd is unavailable ({e}): downloading {url} whole before restoring"
                );
                false
            }
        };
    if !lazy {
        let store = snapshot_store::open_store(&url.store, Access::Read)?;
        snapshot_store::pull(
            store.as_ref(),
            &url.name,
            dir,
            TransferOptions::default(),
            &snapshot_store::NoProgress,
        )
        .await?;
        return Ok(FetchedCheckpoint { lazy: None });
    }
    let runtime = fetch_runtime(seccomp)?;
    let cache_dir = cache_dir.unwrap_or_else(ChunkCache::default_dir);
    let (dir_owned, handle) = (dir.to_path_buf(), runtime.handle().clone());
    // Fetched on the store runtime: its client (connections, retries) must live there.
    let opened = runtime
        .spawn(async move {
            let cache = Arc::new(ChunkCache::open(
                &cache_dir,
                snapshot_store::DEFAULT_CACHE_BYTES,
            )?);
            let store = snapshot_store::open_store(&url.store, Access::Read)?;
            snapshot_store::open_lazy(store, &url.name, &dir_owned, Some(cache), handle).await
        })
        .await
        .map_err(|e| {
            SandboxError::TaskLost(if e.is_panic() {
                "store fetch (panicked)"
            } else {
                "store fetch"
            })
        })??;
    Ok(FetchedCheckpoint {
        lazy: Some(LazyRestore {
            source: opened.memory,
            working_set: opened.working_set,
            fetchers: LazyRestore::DEFAULT_FETCHERS,
        }),
    })
}

/// Pushes the checkpoint in `dir` to `url`.
pub(crate) async fn push_checkpoint(dir: &Path, url: &str) -> Result<PushReport> {
    let url = SnapshotUrl::parse(url)?;
    let store = snapshot_store::open_store(&url.store, Access::Write)?;
    Ok(snapshot_store::push(
        store.as_ref(),
        dir,
        &url.name,
        TransferOptions::default(),
        &snapshot_store::NoProgress,
    )
    .await?)
}
