//! What can go wrong talking to a store. Messages never carry credentials: errors from the
//! object-store client are redacted before they become text ([`crate::redact`]).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot configure the store {store}: {message}")]
    Config { store: String, message: String },
    #[error("{op} {key} in {store}: {message}")]
    Backend {
        op: &'static str,
        key: String,
        store: String,
        message: String,
    },
    #[error("{key} not found in {store}")]
    NotFound { key: String, store: String },
    #[error("{key} in {store} is {len} bytes, more than the {max} allowed")]
    TooLarge {
        key: String,
        store: String,
        len: u64,
        max: u64,
    },
    #[error("chunk {hash} is corrupt: {reason}")]
    CorruptChunk { hash: String, reason: String },
    #[error("invalid store manifest {key}: {reason}")]
    InvalidManifest { key: String, reason: String },
    #[error("snapshot {name} not found in {store} (no {key})")]
    NoSuchSnapshot {
        name: String,
        store: String,
        key: String,
    },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("{0}")]
    Invalid(String),
    #[error("a transfer task failed: {0}")]
    Task(String),
    #[cfg(any(test, feature = "fault-injection"))]
    #[error("injected fault: writes are failing")]
    Injected,
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub(crate) fn io_err(
    op: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}
