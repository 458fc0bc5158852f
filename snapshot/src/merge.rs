//! Collapsing a diff chain into one full snapshot.

use std::path::Path;

use crate::chain::{pages_supplied, resolve_chain};
use crate::error::{io_err, Result, SnapshotError};
use crate::fsutil;
use crate::layout::PAGE_SIZE;
use crate::manifest::{Manifest, PageCounts, SnapshotKind, SnapshotMeta};
use crate::staging::StagingDir;
use crate::state;
use crate::target::TargetPolicy;
use crate::writer::memory_path;

/// Merges the chain ending at `dir` into a full snapshot at `out_dir` (which may be `dir`
/// itself, or absent). The newest layer's state and metadata are kept; every page comes from
/// the newest layer that has it. Only data is copied, so holes stay holes. Written durably.
/// `out_dir` follows the rules of [`crate::write_snapshot`]: a snapshot already there (`dir`
/// itself included) is replaced only with `replace`.
pub fn merge_chain(dir: &Path, out_dir: &Path, replace: bool) -> Result<Manifest> {
    let chain = resolve_chain(dir)?;
    let newest = chain
        .first()
        .ok_or_else(|| SnapshotError::InvalidRequest("empty snapshot chain".into()))?;
    let supplied = pages_supplied(&chain);

    let staging = StagingDir::create(
        out_dir,
        TargetPolicy {
            replace,
            companions: None,
        },
    )?;
    let out_path = memory_path(staging.path());
    let out = fsutil::create_private(&out_path)?;
    out.set_len(newest.manifest.memory_size)
        .map_err(io_err("set length of", &out_path))?;

    let mut written_pages = 0u64;
    for (layer, pages) in chain.iter().zip(&supplied) {
        let src_path = layer.memory_path();
        for (start, count) in pages.runs() {
            let (from, to) = (start * PAGE_SIZE, (start + count) * PAGE_SIZE);
            // Diff files may have holes too (an all-zero dirty page can be a hole), so both
            // kinds of layer copy only their data extents; the output's holes read as zero.
            for (data_start, data_end) in fsutil::data_extents(&layer.memory, &src_path, from, to)?
            {
                fsutil::copy_range(
                    &layer.memory,
                    &src_path,
                    data_start,
                    &out,
                    &out_path,
                    data_start,
                    data_end - data_start,
                )?;
                written_pages += (data_end - data_start).div_ceil(PAGE_SIZE);
            }
        }
    }
    out.sync_all().map_err(io_err("fsync", &out_path))?;

    // Copy the newest state verbatim after checking its header and checksum.
    let state_image = fsutil::read_bounded(
        &state::state_path(&newest.dir),
        state::MAX_STATE_PAYLOAD + state::STATE_HEADER_LEN as u64,
    )?;
    state::verify_state_image(&state_image, &state::state_path(&newest.dir))?;
    fsutil::write_file_atomic(&state::state_path(staging.path()), &state_image, true)?;

    let meta = SnapshotMeta {
        vcpus: newest.manifest.vcpus,
        kernel_id: newest.manifest.kernel_id.clone(),
        rootfs_id: newest.manifest.rootfs_id.clone(),
        host: newest.manifest.host.clone(),
    };
    let total = newest.manifest.page_count();
    let counts = PageCounts {
        total,
        written: written_pages.min(total),
        dirty: 0,
    };
    let manifest = Manifest::new(
        SnapshotKind::Full,
        None,
        &meta,
        newest.manifest.regions.clone(),
        counts,
    )?;
    manifest.write_with(staging.path(), true)?;
    staging.install(out_dir, true)?;
    tracing::debug!(dir = %dir.display(), out = %out_dir.display(), layers = chain.len(), "snapshot chain merged");
    Ok(manifest)
}
