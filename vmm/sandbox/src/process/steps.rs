//! Snapshots of a sandbox process (hibernate, checkpoint): pause over its API, flush the disks,
//! snapshot into a staging directory the process can write (inside its jail), move the files
//! to the caller's directory under the target rules, copy the disks for a checkpoint, then
//! resume (or leave it paused for the caller to stop). Blocking: run on the blocking pool.

use std::path::Path;

use snapshot::{check_snapshot_target, MemoryStorage, TargetPolicy};
use vmm::vm::{SnapshotOutcome, SnapshotVmError};

use super::child::SandboxProcess;
use super::snapshot_move::{self, MoveError};
use crate::checkpoint_files::{self, DiskPlan};
use crate::error::{Result, SandboxError};
use crate::SandboxId;

/// What a snapshot step does around the snapshot itself.
pub(crate) struct SnapshotStep<'a> {
    pub id: &'a SandboxId,
    pub dir: &'a Path,
    pub disks: &'a DiskPlan,
    /// A checkpoint: copy the writable disks next to the snapshot (and replace them with it).
    pub copy_disks: bool,
    pub replace: bool,
    /// Resume afterwards (checkpoint); always on failure.
    pub resume: bool,
}

fn snapshot_error(id: &SandboxId, dir: &Path, e: snapshot::SnapshotError) -> SandboxError {
    SandboxError::Snapshot {
        id: id.clone(),
        dir: dir.to_path_buf(),
        source: Box::new(SnapshotVmError::Snapshot(e)),
    }
}

impl SandboxProcess {
    pub(crate) fn snapshot_step(&self, step: SnapshotStep<'_>) -> Result<SnapshotOutcome> {
        let id = step.id;
        let policy = TargetPolicy {
            replace: step.replace,
            companions: step
                .copy_disks
                .then_some(checkpoint_files::is_checkpoint_file as _),
        };
        // A refused target costs nothing: checked before the VM is even paused.
        check_snapshot_target(step.dir, policy).map_err(|e| snapshot_error(id, step.dir, e))?;
        let control = |operation: &'static str| {
            move |source| SandboxError::ProcessControl {
                id: id.clone(),
                operation,
                source,
            }
        };
        let api = self.api();
        api.pause().map_err(control("pause"))?;
        let result = self.snapshot_paused(&step, policy);
        if step.resume || result.is_err() {
            if let Err(e) = api.resume() {
                tracing::warn!("sandbox {id}: resuming after a snapshot: {e}");
            }
        }
        result
    }

    fn snapshot_paused(
        &self,
        step: &SnapshotStep<'_>,
        policy: TargetPolicy,
    ) -> Result<SnapshotOutcome> {
        let id = step.id;
        step.disks.flush()?;
        let (inside, host) = self.paths().staging(self.next_staging());
        let parent = self.paths().staging_parent_host();
        std::fs::create_dir_all(&parent).map_err(|e| SandboxError::io("creating", &parent, e))?;
        let owner = self.jail_owner();
        if let Some(uid) = self.uid() {
            // The jailed process (its own uid) creates the staging directory in there.
            std::os::unix::fs::chown(&parent, Some(uid), Some(uid))
                .map_err(|e| SandboxError::io("chown", &parent, e))?;
        }
        let result = self
            .api()
            .snapshot(&inside, false, false)
            .map_err(|source| SandboxError::ProcessControl {
                id: id.clone(),
                operation: "snapshot",
                source,
            })
            .and_then(|info| {
                snapshot_move::install(&host, step.dir, policy, owner).map_err(|e| match e {
                    MoveError::Target(e) => snapshot_error(id, step.dir, e),
                    MoveError::Io { what, path, source } => SandboxError::io(what, path, source),
                })?;
                Ok(info)
            });
        let info = match result {
            Ok(info) => info,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&host);
                return Err(e);
            }
        };
        if step.copy_disks {
            step.disks.copy_into(step.dir)?;
        }
        Ok(SnapshotOutcome {
            dir: step.dir.to_path_buf(),
            diff: info.diff,
            snapshot_id: info.snapshot_id,
            parent_id: info.parent_id,
            pages_written: info.pages_written,
            memory: if info.memory == "linked" {
                MemoryStorage::Linked
            } else {
                MemoryStorage::Written
            },
            duration: std::time::Duration::from_millis(info.duration_ms),
            paused: std::time::Duration::from_micros(info.paused_us),
            live: info.live,
            live_unavailable: info.live_unavailable,
            // The sandbox process wrote it; a restore there reads it.
            state: None,
        })
    }
}
