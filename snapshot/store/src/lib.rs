//! Snapshots in object storage: a local directory (`file:///…`) or S3-compatible storage
//! (`s3://bucket/prefix`), behind one small [`Store`] interface.
//!
//! A store holds content-addressed chunks and snapshot manifests (docs/store.md):
//!
//! - `chunks/<sha256>`: one piece of a snapshot file, zstd-compressed, stored once however many
//!   snapshots hold it (a template and its clones share them); all-zero pieces are not stored;
//! - `snapshots/<name>/manifest.json`: the snapshot's files, small ones inline, the others as
//!   chunk lists; written last, so a snapshot is visible exactly when it is complete.
//!
//! [`push`], [`pull`] and [`gc`] move snapshots in and out and delete unreferenced chunks.
//! Everything read from a store is hostile: sizes are bounded and every chunk's hash is checked.

// Store contents and snapshot files are hostile input: outside tests, nothing may unwrap or
// expect. Tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod backend;
mod cache;
mod chunk;
mod error;
#[cfg(any(test, feature = "fault-injection"))]
mod fault;
mod gc;
mod lazy;
mod local;
mod manifest;
mod open;
mod progress;
mod pull;
mod push;
mod redact;
mod s3;
mod store;
mod url;

pub use cache::{ChunkCache, DEFAULT_CACHE_BYTES};
pub use chunk::{chunk_key, hash_of_key, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
pub use error::{Result, StoreError};
#[cfg(any(test, feature = "fault-injection"))]
pub use fault::FailingWrites;
pub use gc::{gc, GcReport, DEFAULT_GRACE};
pub use lazy::{fetch_runtime, open_lazy, FetchCounters, LazySnapshot, StoreMemory};
pub use local::LocalStore;
pub use manifest::{manifest_key, Content, StoreManifest, StoredFile, STORE_FORMAT};
pub use open::{open_store, Access};
pub use progress::{NoProgress, Progress};
pub use pull::{pull, read_manifest};
pub use push::{push, PushReport, TransferOptions, REUSE_MAX_AGE};
pub use s3::{RetryPolicy, S3Config, S3Store};
pub use store::{ObjectInfo, Store};
pub use url::{valid_name, SnapshotUrl, StoreUrl};

#[cfg(test)]
mod tests;
