//! `push`: a snapshot directory into a store. Chunks first (each stored once, skipped if the
//! store has it), the manifest last: an interrupted push leaves chunks but no snapshot.
//!
//! Diff snapshots are merged into a full view first (in a temporary directory beside the
//! snapshot) and that is pushed: a pulled snapshot never depends on a parent elsewhere, and
//! since chunks are content-addressed, pushing a diff's merged view uploads only the chunks
//! its pages changed.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::chunk::{self, chunk_key};
use crate::error::{io_err, Result, StoreError};
use crate::manifest::{
    encode_inline, manifest_key, Content, StoreManifest, StoredFile, INLINE_MAX, MAX_FILES,
    STORE_FORMAT,
};
use crate::progress::Progress;
use crate::store::Store;
use crate::url::valid_name;

/// A chunk the store already has is reused only if it was written this recently; older ones are
/// written again, which renews their age. That is what keeps `gc` from deleting a chunk a push
/// relies on: see docs/store.md ("gc safety").
pub const REUSE_MAX_AGE: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, Debug)]
pub struct TransferOptions {
    /// Chunk transfers in flight at once (each holds up to two chunks in memory).
    pub concurrency: usize,
    pub chunk_size: u64,
    /// Push: reuse a chunk already stored only if it is younger than this ([`REUSE_MAX_AGE`]).
    pub reuse_max_age: Duration,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            concurrency: 8,
            chunk_size: chunk::DEFAULT_CHUNK_SIZE,
            reuse_max_age: REUSE_MAX_AGE,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushReport {
    pub files: usize,
    /// Non-zero chunks of the snapshot.
    pub chunks: u64,
    /// All-zero chunks (not stored).
    pub zero_chunks: u64,
    /// Chunks this push wrote (the rest were in the store already).
    pub uploaded_chunks: u64,
    /// Compressed bytes this push wrote (chunks and manifest).
    pub uploaded_bytes: u64,
    /// Bytes of the snapshot's files.
    pub snapshot_bytes: u64,
}

/// One piece of a file to store.
struct Piece {
    file: usize,
    index: usize,
    offset: u64,
    len: usize,
}

enum PieceOutcome {
    Zero,
    Stored { hash: String, uploaded: Option<u64> },
}

/// Pushes the snapshot in `dir` as `name`. Refuses a name that already exists in the store.
pub async fn push(
    store: &dyn Store,
    dir: &Path,
    name: &str,
    options: TransferOptions,
    progress: &dyn Progress,
) -> Result<PushReport> {
    if !valid_name(name) {
        return Err(StoreError::Invalid(format!(
            "snapshot name {name:?} is not valid"
        )));
    }
    if !(chunk::MIN_CHUNK_SIZE..=chunk::MAX_CHUNK_SIZE).contains(&options.chunk_size)
        || !options.chunk_size.is_power_of_two()
    {
        return Err(StoreError::Invalid(format!(
            "chunk size {} is not a power of two in {}..={}",
            options.chunk_size,
            chunk::MIN_CHUNK_SIZE,
            chunk::MAX_CHUNK_SIZE
        )));
    }
    let key = manifest_key(name);
    if store.head(&key).await?.is_some() {
        return Err(StoreError::Invalid(format!(
            "{} already holds a snapshot named {name}; push under another name",
            store.describe()
        )));
    }
    let snapshot_manifest = snapshot::Manifest::read(dir)?;
    // A diff is pushed as its merged full view; the temporary directory lives until the end.
    let merged = match snapshot_manifest.kind {
        snapshot::SnapshotKind::Full => None,
        snapshot::SnapshotKind::Diff => Some(merge_diff(dir).await?),
    };
    let files = list_files(dir, merged.as_ref().map(|(_, path)| path.as_path()))?;
    tracing::info!(
        dir = %dir.display(),
        to = %format!("{}/{name}", store.describe()),
        files = files.len(),
        merged_diff = merged.is_some(),
        "pushing snapshot"
    );

    let mut report = PushReport {
        files: files.len(),
        ..PushReport::default()
    };
    let mut stored = Vec::with_capacity(files.len());
    let mut pieces = Vec::new();
    let mut open = Vec::with_capacity(files.len());
    for (i, (file_name, path)) in files.iter().enumerate() {
        let file = File::open(path).map_err(io_err("open", path))?;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        report.snapshot_bytes += len;
        if len <= INLINE_MAX {
            let mut data = vec![0u8; len as usize];
            file.read_exact_at(&mut data, 0)
                .map_err(io_err("read", path))?;
            stored.push(StoredFile {
                name: file_name.clone(),
                len,
                content: Content::Inline(encode_inline(&data)),
            });
        } else {
            let count = len.div_ceil(options.chunk_size);
            for index in 0..count {
                let offset = index * options.chunk_size;
                pieces.push(Piece {
                    file: i,
                    index: index as usize,
                    offset,
                    len: (len - offset).min(options.chunk_size) as usize,
                });
            }
            stored.push(StoredFile {
                name: file_name.clone(),
                len,
                content: Content::Chunks(vec![None; count as usize]),
            });
        }
        open.push(Arc::new(file));
    }

    progress.start(pieces.iter().map(|p| p.len as u64).sum());
    let outcomes: Vec<(usize, usize, PieceOutcome)> = futures::stream::iter(pieces)
        .map(|piece| {
            let file = open[piece.file].clone();
            let path = files[piece.file].1.clone();
            async move {
                let outcome = push_piece(store, file, &path, &piece, options.reuse_max_age).await?;
                progress.advance(piece.len as u64);
                Ok::<_, StoreError>((piece.file, piece.index, outcome))
            }
        })
        .buffer_unordered(options.concurrency.max(1))
        .try_collect()
        .await?;
    progress.finish();

    for (file, index, outcome) in outcomes {
        match outcome {
            PieceOutcome::Zero => report.zero_chunks += 1,
            PieceOutcome::Stored { hash, uploaded } => {
                report.chunks += 1;
                if let Some(bytes) = uploaded {
                    report.uploaded_chunks += 1;
                    report.uploaded_bytes += bytes;
                }
                if let Content::Chunks(chunks) = &mut stored[file].content {
                    chunks[index] = Some(hash);
                }
            }
        }
    }

    let manifest = StoreManifest {
        format: STORE_FORMAT,
        name: name.to_string(),
        created_unix_secs: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        snapshot_id: snapshot_manifest.snapshot_id.to_string(),
        chunk_size: options.chunk_size,
        files: stored,
    };
    let json = manifest.to_json()?;
    report.uploaded_bytes += json.len() as u64;
    // Last: from here on the snapshot exists for readers. Created only if absent, so of two
    // pushes racing for one name, one fails instead of silently replacing the other.
    if !store.put_new(&key, Bytes::from(json)).await? {
        return Err(StoreError::Invalid(format!(
            "{} already holds a snapshot named {name} (pushed meanwhile); push under another name",
            store.describe()
        )));
    }
    tracing::info!(?report, "snapshot pushed");
    Ok(report)
}

async fn push_piece(
    store: &dyn Store,
    file: Arc<File>,
    path: &Path,
    piece: &Piece,
    reuse_max_age: Duration,
) -> Result<PieceOutcome> {
    let (offset, len) = (piece.offset, piece.len);
    let path_buf = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || -> Result<Option<(String, Vec<u8>)>> {
        if is_hole(&file, offset, len as u64) {
            return Ok(None);
        }
        let mut data = vec![0u8; len];
        file.read_exact_at(&mut data, offset)
            .map_err(io_err("read", &path_buf))?;
        if data.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        Ok(Some((chunk::hash_hex(&data), data)))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))??;
    let Some((hash, data)) = read else {
        return Ok(PieceOutcome::Zero);
    };
    let key = chunk_key(&hash);
    if let Some(existing) = store.head(&key).await? {
        let age = SystemTime::now()
            .duration_since(existing.last_modified)
            .unwrap_or_default();
        if age < reuse_max_age {
            return Ok(PieceOutcome::Stored {
                hash,
                uploaded: None,
            });
        }
    }
    let packed = tokio::task::spawn_blocking(move || chunk::compress(&data))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
    let bytes = packed.len() as u64;
    store.put(&key, Bytes::from(packed)).await?;
    Ok(PieceOutcome::Stored {
        hash,
        uploaded: Some(bytes),
    })
}

/// Whether `offset..offset + len` of `file` is one hole (no data extent starts before its end):
/// sparse memory files are mostly holes, and skipping them saves reading gigabytes of zeros.
/// Any doubt (an error, a file system without SEEK_DATA) answers `false`: the bytes are read.
fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(start) = libc::off_t::try_from(offset) else {
        return false;
    };
    // SAFETY: lseek on a file descriptor we own (borrowed from `file`, open for the call); it
    // only moves that descriptor's offset, which nothing else uses (reads are positional).
    let next = unsafe { libc::lseek(file.as_raw_fd(), start, libc::SEEK_DATA) };
    if next < 0 {
        // ENXIO: no data at or after `offset`.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    u64::try_from(next).is_ok_and(|next| next >= offset.saturating_add(len))
}

/// The files to push: the snapshot's own (from the merged view for a diff) and its companions
/// (the sandbox library's `disk-N.img`), in a stable order. Anything that is not a regular file
/// with a plain name is refused rather than silently left behind.
fn list_files(dir: &Path, merged: Option<&Path>) -> Result<Vec<(String, PathBuf)>> {
    let mut files: HashMap<String, PathBuf> = HashMap::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if !regular || !valid_name(&name) || name.starts_with('.') {
            return Err(StoreError::Invalid(format!(
                "{} holds {name:?}, which is not a regular file with a plain name: \
                 a snapshot directory holds only its files",
                dir.display()
            )));
        }
        files.insert(name, entry.path());
    }
    if let Some(merged) = merged {
        // The merged view replaces the diff's own snapshot files (it has no pages.bitmap).
        // The diff's working set stays: it describes the newest state.
        files.retain(|name, _| {
            name == snapshot::WORKING_SET_FILE || !snapshot::SNAPSHOT_FILES.contains(&name.as_str())
        });
        for name in snapshot::SNAPSHOT_FILES {
            let path = merged.join(name);
            if name == snapshot::WORKING_SET_FILE {
                continue;
            }
            if path.exists() {
                files.insert(name.to_string(), path);
            }
        }
    }
    if files.len() > MAX_FILES {
        return Err(StoreError::Invalid(format!(
            "{} holds more than {MAX_FILES} files",
            dir.display()
        )));
    }
    let mut files: Vec<_> = files.into_iter().collect();
    files.sort();
    Ok(files)
}

async fn merge_diff(dir: &Path) -> Result<(tempfile::TempDir, PathBuf)> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".dormouse-push-")
        .tempdir_in(parent)
        .map_err(io_err("create a temporary directory in", parent))?;
    let out = tmp.path().join("merged");
    let (from, to) = (dir.to_path_buf(), out.clone());
    tokio::task::spawn_blocking(move || snapshot::merge_chain(&from, &to, false))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
    tracing::info!(dir = %dir.display(), "diff snapshot merged into a full view for the push");
    Ok((tmp, out))
}
