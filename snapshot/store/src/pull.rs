//! `pull`: a snapshot from a store into a local directory. Written into a private staging
//! directory beside the target and renamed into place only when every chunk has been fetched
//! and checked: a failed pull leaves nothing behind, and never writes into user data (the
//! target must be missing or empty, as for every snapshot target).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::chunk::{self, chunk_key};
use crate::error::{io_err, Result, StoreError};
use crate::manifest::{
    decode_inline, manifest_key, Content, StoreManifest, StoredFile, MAX_STORE_MANIFEST_LEN,
};
use crate::progress::Progress;
use crate::push::TransferOptions;
use crate::store::Store;

/// Reads and checks the manifest of snapshot `name`.
pub async fn read_manifest(store: &dyn Store, name: &str) -> Result<StoreManifest> {
    let key = manifest_key(name);
    let bytes = match store.get(&key, MAX_STORE_MANIFEST_LEN).await {
        Err(StoreError::NotFound { .. }) => {
            return Err(StoreError::NoSuchSnapshot {
                name: name.to_string(),
                store: store.describe(),
                key,
            })
        }
        other => other?,
    };
    let manifest = StoreManifest::parse(&bytes, &key)?;
    if manifest.name != name {
        return Err(StoreError::InvalidManifest {
            key,
            reason: format!("it names snapshot {:?}", manifest.name),
        });
    }
    Ok(manifest)
}

/// Pulls snapshot `name` into `dir` (missing or empty).
pub async fn pull(
    store: &dyn Store,
    name: &str,
    dir: &Path,
    options: TransferOptions,
    progress: &dyn Progress,
) -> Result<StoreManifest> {
    snapshot::check_snapshot_target(dir, snapshot::TargetPolicy::default())?;
    let manifest = read_manifest(store, name).await?;
    let dir = &dir.components().collect::<std::path::PathBuf>();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_err("create", &parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".dormouse-pull-")
        .tempdir_in(&parent)
        .map_err(io_err("create a staging directory in", &parent))?;
    // 0700, like every snapshot directory: guest memory is for nobody else to read.
    std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("set permissions of", staging.path()))?;
    tracing::info!(from = %format!("{}/{name}", store.describe()), dir = %dir.display(), "pulling snapshot");

    let (files, pieces) = create_files(&manifest, staging.path(), |_| false)?;

    progress.start(pieces.iter().map(|p| p.len).sum());
    futures::stream::iter(pieces)
        .map(|piece| async move {
            let len = piece.len;
            fetch_piece(store, piece).await?;
            progress.advance(len);
            Ok::<_, StoreError>(())
        })
        .buffer_unordered(options.concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    progress.finish();

    for (file, path) in &files {
        file.sync_all().map_err(io_err("fsync", path))?;
    }
    // Only a real snapshot is installed (this also checks the pulled manifest.json).
    snapshot::Manifest::read(staging.path())?;
    // Same checks again just before the rename: something may have appeared meanwhile. A rename
    // onto an empty directory replaces it; onto a non-empty one it fails.
    snapshot::check_snapshot_target(dir, snapshot::TargetPolicy::default())?;
    let staged = staging.keep();
    if let Err(e) = std::fs::rename(&staged, dir) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(io_err("move the pulled snapshot to", dir)(e));
    }
    if let Ok(parent) = File::open(&parent) {
        let _ = parent.sync_all();
    }
    tracing::info!(dir = %dir.display(), snapshot_id = %manifest.snapshot_id, "snapshot pulled");
    Ok(manifest)
}

/// A file created for a pull, to be synced once its chunks are in.
pub(crate) type CreatedFile = (Arc<File>, PathBuf);

/// One stored chunk of a file being brought from a store, and where it goes.
pub(crate) struct Piece {
    pub file: Arc<File>,
    pub path: PathBuf,
    pub hash: String,
    pub offset: u64,
    pub len: u64,
}

/// Creates (0600, exclusively) in `dir` every file of `manifest` that `skip` does not name, at
/// its length (holes read as zero: all-zero chunks need no write), writes the inline ones, and
/// returns the files and the chunks still to fetch. The snapshot's own manifest.json is created
/// last, as a snapshot writer would.
pub(crate) fn create_files(
    manifest: &StoreManifest,
    dir: &Path,
    skip: impl Fn(&StoredFile) -> bool,
) -> Result<(Vec<CreatedFile>, Vec<Piece>)> {
    let mut pieces = Vec::new();
    let mut files = Vec::new();
    let mut order: Vec<_> = manifest.files.iter().filter(|f| !skip(f)).collect();
    order.sort_by_key(|f| f.name == snapshot::MANIFEST_FILE);
    for stored in order {
        let path = dir.join(&stored.name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("create", &path))?;
        file.set_len(stored.len)
            .map_err(io_err("set length of", &path))?;
        let file = Arc::new(file);
        match &stored.content {
            Content::Inline(data) => {
                let data = decode_inline(data)
                    .map_err(|e| StoreError::Invalid(format!("inline {}: {e}", stored.name)))?;
                file.write_all_at(&data, 0)
                    .map_err(io_err("write", &path))?;
            }
            Content::Chunks(chunks) => {
                for (index, hash) in chunks.iter().enumerate() {
                    let Some(hash) = hash else { continue };
                    let offset = index as u64 * manifest.chunk_size;
                    pieces.push(Piece {
                        file: file.clone(),
                        path: path.clone(),
                        hash: hash.clone(),
                        offset,
                        len: (stored.len - offset).min(manifest.chunk_size),
                    });
                }
            }
        }
        files.push((file, path));
    }
    Ok((files, pieces))
}

/// The stored (compressed) chunk `hash` of `len` bytes, read no further than zstd's bound for
/// that length: a chunk that is missing or longer is corrupt.
pub(crate) async fn get_chunk(store: &dyn Store, hash: &str, len: u64) -> Result<Bytes> {
    match store
        .get(&chunk_key(hash), chunk::max_compressed_len(len))
        .await
    {
        Err(StoreError::NotFound { .. }) => Err(StoreError::CorruptChunk {
            hash: hash.to_string(),
            reason: format!("it is missing from {}", store.describe()),
        }),
        Err(StoreError::TooLarge { len: got, .. }) => Err(StoreError::CorruptChunk {
            hash: hash.to_string(),
            reason: format!("it is {got} bytes, more than {len} bytes compress to"),
        }),
        other => other,
    }
}

async fn fetch_piece(store: &dyn Store, piece: Piece) -> Result<()> {
    let packed = get_chunk(store, &piece.hash, piece.len).await?;
    tokio::task::spawn_blocking(move || -> Result<()> {
        let data = chunk::decode(&piece.hash, &packed, piece.len as usize)?;
        piece
            .file
            .write_all_at(&data, piece.offset)
            .map_err(io_err("write", &piece.path))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}
