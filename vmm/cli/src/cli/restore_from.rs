//! `restore --from URL`: a snapshot in a store, restored either lazily (guest memory fetched on
//! first touch through userfaultfd, the rest streamed, chunks cached host-wide) or after
//! downloading it whole (`--fetch full`, or when userfaultfd is unavailable: logged).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::ValueEnum;

use snapshot_store::{Access, ChunkCache, SnapshotUrl, StoreMemory};
use vmm::seccomp::SeccompLevel;
use vmm::LazyRestore;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FetchMode {
    /// Start at once: memory pages are fetched on first touch, the rest streamed behind.
    Lazy,
    /// Download the whole snapshot first.
    Full,
}

/// A snapshot brought from a store; keeps what the VM needs while it runs (the temporary
/// directory, the store client's runtime).
pub struct FromStore {
    pub dir: PathBuf,
    pub lazy: Option<LazyRestore>,
    memory: Option<Arc<StoreMemory>>,
    runtime: Option<tokio::runtime::Runtime>,
    _tmp: tempfile::TempDir,
}

impl FromStore {
    /// Logs what a lazy restore fetched (when the VM ends).
    pub fn finish(mut self) {
        if let Some(memory) = &self.memory {
            let c = memory.counters();
            tracing::info!(
                "lazy memory: {} chunks fetched from the store ({:.1} MiB sent), {} from the \
                 chunk cache",
                c.fetched,
                c.fetched_bytes as f64 / (1 << 20) as f64,
                c.cache_hits
            );
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

pub struct FromStoreArgs<'a> {
    pub url: &'a str,
    pub fetch: FetchMode,
    pub chunk_cache: Option<&'a Path>,
    pub chunk_cache_mib: u64,
    pub seccomp: SeccompLevel,
}

pub fn prepare(args: FromStoreArgs<'_>) -> anyhow::Result<FromStore> {
    let url = SnapshotUrl::parse(args.url)?;
    let tmp = tempfile::Builder::new()
        .prefix("dormouse-restore-")
        .tempdir()
        .context("creating a temporary directory for the snapshot")?;
    let dir = tmp.path().join("snapshot");
    let lazy_possible = match args.fetch {
        FetchMode::Full => false,
        FetchMode::Lazy => match snapshot::Userfaultfd::new() {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(
                    "userfaultfd is unavailable ({e}; it needs root, CAP_SYS_PTRACE or \
                     vm.unprivileged_userfaultfd=1): downloading the whole snapshot first"
                );
                false
            }
        },
    };
    if !lazy_possible {
        tracing::info!("downloading {url} into {} before restoring", dir.display());
        super::snapshot_cmd::pull(&url, &dir, super::snapshot_cmd::TransferArgs { jobs: 8 })?;
        return Ok(FromStore {
            dir,
            lazy: None,
            memory: None,
            runtime: None,
            _tmp: tmp,
        });
    }

    // The store client's threads are store fetchers too: filtered as soon as they start.
    let runtime = snapshot_store::fetch_runtime(vmm::seccomp::store_fetch_hook(args.seccomp))
        .context("starting the store client")?;
    let cache_dir = args
        .chunk_cache
        .map(Path::to_path_buf)
        .unwrap_or_else(ChunkCache::default_dir);
    let cache = Arc::new(
        ChunkCache::open(&cache_dir, args.chunk_cache_mib << 20)
            .with_context(|| format!("opening the chunk cache {}", cache_dir.display()))?,
    );
    let started = std::time::Instant::now();
    let opened = runtime
        .block_on(async {
            let store = snapshot_store::open_store(&url.store, Access::Read)?;
            snapshot_store::open_lazy(
                store,
                &url.name,
                &dir,
                Some(cache),
                runtime.handle().clone(),
            )
            .await
        })
        .with_context(|| format!("opening {url} for a lazy restore"))?;
    tracing::info!(
        "restoring {url} lazily: its memory is fetched on first touch (chunk cache {}), \
         state fetched in {:.1} ms{}",
        cache_dir.display(),
        started.elapsed().as_secs_f64() * 1e3,
        match &opened.working_set {
            Some(set) => format!(", working set {} pages first", set.count_ones()),
            None => String::new(),
        }
    );
    Ok(FromStore {
        dir,
        lazy: Some(LazyRestore {
            source: opened.memory.clone(),
            working_set: opened.working_set,
            fetchers: LazyRestore::DEFAULT_FETCHERS,
        }),
        memory: Some(opened.memory),
        runtime: Some(runtime),
        _tmp: tmp,
    })
}
