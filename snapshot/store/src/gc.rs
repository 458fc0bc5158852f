//! `gc`: deletes chunks no manifest references, once they are older than a grace period.
//!
//! Why that is safe against concurrent pushes (docs/store.md has the long form): a push writes
//! its chunks before its manifest, and reuses an existing chunk only if it was written within
//! [`crate::push::REUSE_MAX_AGE`] (else it writes it again). gc lists chunks first, manifests
//! second, and deletes only unreferenced chunks older than `grace`. A chunk a running push
//! relies on is younger than `REUSE_MAX_AGE` + that push's duration; so with `grace` longer than
//! that, gc leaves it alone, and once the push's manifest exists gc sees the reference.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};

use crate::chunk::{hash_of_key, CHUNKS_PREFIX};
use crate::error::{Result, StoreError};
use crate::manifest::{StoreManifest, MAX_STORE_MANIFEST_LEN, SNAPSHOTS_PREFIX};
use crate::store::Store;

/// The default grace: far longer than any push plus [`crate::push::REUSE_MAX_AGE`].
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub snapshots: usize,
    pub chunks: usize,
    pub referenced: usize,
    pub deleted: usize,
    pub deleted_bytes: u64,
    /// Unreferenced but younger than the grace period (perhaps a push in progress).
    pub kept_young: usize,
}

pub async fn gc(store: &dyn Store, grace: Duration, concurrency: usize) -> Result<GcReport> {
    // Chunks before manifests: a manifest written after this listing is still seen below.
    let chunks = store.list(CHUNKS_PREFIX).await?;
    let listed = store.list(SNAPSHOTS_PREFIX).await?;
    let mut referenced = HashSet::new();
    let mut snapshots = 0;
    for object in listed.iter().filter(|o| o.key.ends_with("/manifest.json")) {
        // A manifest we cannot read might reference anything: stop rather than guess.
        let bytes = store.get(&object.key, MAX_STORE_MANIFEST_LEN).await?;
        let manifest = StoreManifest::parse(&bytes, &object.key)?;
        referenced.extend(manifest.chunk_hashes().map(str::to_string));
        snapshots += 1;
    }
    let now = SystemTime::now();
    let old = |t: SystemTime| now.duration_since(t).is_ok_and(|age| age >= grace);
    let mut report = GcReport {
        snapshots,
        chunks: chunks.len(),
        referenced: 0,
        ..GcReport::default()
    };
    let mut doomed = Vec::new();
    for chunk in &chunks {
        // Objects under chunks/ that are not chunks are not ours to delete.
        let Some(hash) = hash_of_key(&chunk.key) else {
            continue;
        };
        if referenced.contains(hash) {
            report.referenced += 1;
        } else if old(chunk.last_modified) {
            doomed.push(chunk.clone());
        } else {
            report.kept_young += 1;
        }
    }
    let deleted: Vec<Option<u64>> = futures::stream::iter(doomed)
        .map(|chunk| async move {
            // Re-check just before deleting: a push may have written it again meanwhile.
            match store.head(&chunk.key).await? {
                Some(now_info) if old(now_info.last_modified) => {
                    store.delete(&chunk.key).await?;
                    Ok::<_, StoreError>(Some(now_info.size))
                }
                _ => Ok(None),
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    for size in deleted {
        match size {
            Some(size) => {
                report.deleted += 1;
                report.deleted_bytes += size;
            }
            None => report.kept_young += 1,
        }
    }
    tracing::info!(store = %store.describe(), ?report, "garbage collected");
    Ok(report)
}
