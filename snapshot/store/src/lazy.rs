//! A snapshot in a store opened for a lazy restore: every file but the memory is fetched into
//! a local directory; the memory is served chunk by chunk ([`StoreMemory`], a
//! [`snapshot::ChunkSource`]) through a host-wide [`ChunkCache`].

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::cache::ChunkCache;
use crate::chunk;
use crate::error::{io_err, Result, StoreError};
use crate::manifest::{Content, StoreManifest};
use crate::pull::{create_files, get_chunk, read_manifest};
use crate::store::Store;

/// Chunk fetches in flight while the small files are fetched.
const FILE_FETCH_CONCURRENCY: usize = 8;

/// What was fetched for a lazy restore.
pub struct LazySnapshot {
    pub manifest: StoreManifest,
    /// The snapshot's memory, to be served on demand.
    pub memory: Arc<StoreMemory>,
    /// The snapshot's working set, if it recorded one (memory-file pages).
    pub working_set: Option<snapshot::PageBitmap>,
}

/// Fetch counters of a [`StoreMemory`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchCounters {
    /// Chunks read from the store.
    pub fetched: u64,
    /// Bytes read from the store (compressed, as sent).
    pub fetched_bytes: u64,
    /// Chunks found in the local cache.
    pub cache_hits: u64,
}

/// The memory file of a snapshot in a store.
pub struct StoreMemory {
    store: Arc<dyn Store>,
    hashes: Vec<Option<String>>,
    chunk_size: u64,
    cache: Option<Arc<ChunkCache>>,
    runtime: tokio::runtime::Handle,
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
    cache_hits: AtomicU64,
}

impl StoreMemory {
    pub fn counters(&self) -> FetchCounters {
        FetchCounters {
            fetched: self.fetched.load(Ordering::Relaxed),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
        }
    }
}

impl snapshot::ChunkSource for StoreMemory {
    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn is_zero(&self, index: u64) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.hashes.get(i))
            .is_none_or(|h| h.is_none())
    }

    fn fetch(&self, index: u64, len: usize) -> std::result::Result<Vec<u8>, String> {
        let hash = usize::try_from(index)
            .ok()
            .and_then(|i| self.hashes.get(i))
            .and_then(|h| h.as_deref())
            .ok_or_else(|| format!("chunk {index} is not in the manifest"))?;
        let fetched = self.runtime.block_on(fetch_chunk(
            self.store.as_ref(),
            self.cache.as_deref(),
            hash,
            len,
        ));
        match fetched {
            Ok((data, Source::Cache)) => {
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                Ok(data)
            }
            Ok((data, Source::Store(sent))) => {
                self.fetched.fetch_add(1, Ordering::Relaxed);
                self.fetched_bytes.fetch_add(sent, Ordering::Relaxed);
                Ok(data)
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

enum Source {
    Cache,
    /// Fetched from the store: this many bytes were sent.
    Store(u64),
}

/// A chunk from the cache or the store, checked; a fetched chunk is cached.
async fn fetch_chunk(
    store: &dyn Store,
    cache: Option<&ChunkCache>,
    hash: &str,
    len: usize,
) -> Result<(Vec<u8>, Source)> {
    if let Some(data) = cache.and_then(|c| c.get(hash, len)) {
        return Ok((data, Source::Cache));
    }
    let packed = get_chunk(store, hash, len as u64).await?;
    let data = chunk::decode(hash, &packed, len)?;
    if let Some(cache) = cache {
        cache.put(hash, &packed);
    }
    Ok((data, Source::Store(packed.len() as u64)))
}

/// A runtime for the store client of lazy restores: two workers and at most eight blocking
/// threads, each running `on_thread_start` first (their seccomp filter).
pub fn fetch_runtime(
    on_thread_start: impl Fn() + Send + Sync + 'static,
) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .thread_name("store-fetch")
        .on_thread_start(on_thread_start)
        .enable_all()
        .build()
}

/// Opens snapshot `name` of `store` for a lazy restore: writes every file except `memory.bin`
/// into `dir` (missing or empty), and returns the memory as a chunk source whose fetches run
/// on `runtime`. Chunks go through `cache` when given.
pub async fn open_lazy(
    store: Arc<dyn Store>,
    name: &str,
    dir: &Path,
    cache: Option<Arc<ChunkCache>>,
    runtime: tokio::runtime::Handle,
) -> Result<LazySnapshot> {
    snapshot::check_snapshot_target(dir, snapshot::TargetPolicy::default())?;
    let manifest = read_manifest(store.as_ref(), name).await?;
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let memory = manifest
        .files
        .iter()
        .find(|f| f.name == snapshot::MEMORY_FILE)
        .ok_or_else(|| {
            StoreError::Invalid(format!(
                "{name}: the snapshot has no {}",
                snapshot::MEMORY_FILE
            ))
        })?;
    let (hashes, memory_len) = match &memory.content {
        Content::Chunks(hashes) => (hashes.clone(), memory.len),
        Content::Inline(_) => {
            return Err(StoreError::Invalid(format!(
                "{name}: its memory is inline ({} bytes): too small to fetch lazily, pull it",
                memory.len
            )))
        }
    };
    let (_, pieces) = create_files(&manifest, dir, |f| f.name == snapshot::MEMORY_FILE)?;
    let cache_ref = cache.as_deref();
    let store_ref = store.as_ref();
    futures::stream::iter(pieces)
        .map(|piece| async move {
            let len = usize::try_from(piece.len)
                .map_err(|_| StoreError::Invalid(format!("a chunk of {} bytes", piece.len)))?;
            let (data, _) = fetch_chunk(store_ref, cache_ref, &piece.hash, len).await?;
            piece
                .file
                .write_all_at(&data, piece.offset)
                .map_err(io_err("write", &piece.path))
        })
        .buffer_unordered(FILE_FETCH_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    // The local part must be a real snapshot whose memory is the store's memory file.
    let local = snapshot::Manifest::read(dir)?;
    let file_len = snapshot::validate_layout(&local.regions)
        .map_err(|reason| StoreError::Invalid(format!("{name}: its manifest.json: {reason}")))?;
    if file_len != memory_len {
        return Err(StoreError::Invalid(format!(
            "{name}: memory.bin is {memory_len} bytes, its manifest.json lays out {file_len}"
        )));
    }
    let working_set = match std::fs::read(dir.join(snapshot::WORKING_SET_FILE)) {
        Ok(bytes) => match snapshot::decode_working_set(&bytes, file_len / snapshot::PAGE_SIZE) {
            Ok(set) => Some(set),
            Err(e) => {
                tracing::warn!("{name}: ignoring its working set: {e}");
                None
            }
        },
        Err(_) => None,
    };
    Ok(LazySnapshot {
        memory: Arc::new(StoreMemory {
            store,
            hashes,
            chunk_size: manifest.chunk_size,
            cache,
            runtime,
            fetched: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
        }),
        working_set,
        manifest,
    })
}
