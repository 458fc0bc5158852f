//! The one error type of the crate. Every variant names the file (or directory) involved so a
//! refused restore says what is wrong and where.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("live snapshots are not possible here: {0}")]
    LiveUnsupported(String),
    #[error("live snapshot failed: {0}")]
    LiveFailed(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{path}: bad magic {found:02x?} (not a dormouse {what} file)")]
    BadMagic {
        path: PathBuf,
        what: &'static str,
        found: [u8; 8],
    },

    #[error("{path}: snapshot format {found} is not supported: this dormouse reads formats {oldest} to {newest}{hint}", hint = version_hint(*found, *newest))]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        oldest: u32,
        newest: u32,
    },

    #[error("{path}: header checksum mismatch (header is corrupt)")]
    HeaderChecksum { path: PathBuf },

    #[error(
        "{path}: payload checksum mismatch (expected {expected:#010x}, computed {actual:#010x})"
    )]
    PayloadChecksum {
        path: PathBuf,
        expected: u32,
        actual: u32,
    },

    #[error("{path}: truncated or over-long file: expected {expected} bytes, found {actual}")]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error("{path}: {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { path: PathBuf, len: u64, max: u64 },

    #[error("serializing the VM state: {0}")]
    Encode(String),

    #[error("{path}: cannot decode the VM state: {reason}")]
    Decode { path: PathBuf, reason: String },

    #[error("{path}: invalid manifest JSON: {source}")]
    ManifestParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: invalid manifest: {reason}")]
    InvalidManifest { path: PathBuf, reason: String },

    #[error("{path}: invalid page bitmap: {reason}")]
    InvalidBitmap { path: PathBuf, reason: String },

    #[error("{path}: memory file is {actual} bytes but the manifest says {expected}")]
    MemoryFileTooSmall {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error("snapshot {child}: parent snapshot {parent} cannot be read: {source}")]
    MissingParent {
        child: PathBuf,
        parent: PathBuf,
        #[source]
        source: Box<SnapshotError>,
    },

    #[error(
        "snapshot {child}: parent {parent} has id {found}, but the child was taken from {expected}"
    )]
    ParentMismatch {
        child: PathBuf,
        parent: PathBuf,
        expected: String,
        found: String,
    },

    #[error("snapshot chain has a cycle: {path} appears twice")]
    ChainCycle { path: PathBuf },

    #[error("snapshot chain starting at {path} is longer than {max} snapshots")]
    ChainTooLong { path: PathBuf, max: usize },

    #[error("snapshot {child}: memory layout differs from its parent {parent}")]
    LayoutMismatch { child: PathBuf, parent: PathBuf },

    #[error("invalid guest memory for a snapshot: {0}")]
    InvalidMemory(String),

    #[error("invalid snapshot request: {0}")]
    InvalidRequest(String),

    #[error("mapping guest memory region at {guest_addr:#x}: {source}")]
    Mmap {
        guest_addr: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },

    #[error("building guest memory: {0}")]
    GuestMemory(String),

    #[error("snapshot is not compatible with this host: {}", reasons.join("; "))]
    Incompatible { reasons: Vec<String> },

    /// The target of a snapshot is not a place dormouse may write one; nothing was changed.
    #[error("refusing to write a snapshot to {path}: {reason}")]
    TargetRefused { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, SnapshotError>;

/// Shorthand for wrapping an `io::Error` with the operation and path it came from.
pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> SnapshotError {
    let path = path.into();
    move |source| SnapshotError::Io { op, path, source }
}

fn version_hint(found: u32, newest: u32) -> &'static str {
    if found > newest {
        " (it was written by a newer dormouse: restore it with that version or later)"
    } else {
        " (it was written by an older dormouse that this version no longer reads)"
    }
}
