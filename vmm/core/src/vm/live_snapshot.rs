//! Live snapshots of a running VM (`SnapshotOptions::live`): memory is write-protected while the
//! guest still runs (`snapshot::prepare_live_snapshot`); the guest is then paused only while its
//! vCPU and device state are read and the pages it wrote meanwhile are protected again; the
//! memory file is written while it runs again (pages the guest writes first are saved first).
//! Same files as a paused snapshot taken at the pause; same restore.
//!
//! Only a booted VM's anonymous memory can be write-protected: a restored VM's memory is a
//! private mapping of a snapshot file and a `--mem-dir` VM's is a shared file (its full snapshot
//! is a hard link, O(1) already); diffs are small. Those are taken paused, and the outcome says
//! why (`live_unavailable`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshot::{LiveOptions, LiveSnapshot, MemorySource, PageBitmap, PreparedLive, TargetPolicy};

use super::core::{Lineage, MemoryOrigin, VmCore};
use super::error::SnapshotVmError;
use super::state::VmSnapshotState;
use crate::memory_residency::{self, Method};

/// A live snapshot taken.
pub(super) struct LiveTaken {
    pub manifest: snapshot::Manifest,
    /// How long the guest was paused (zero if it was paused before).
    pub paused: Duration,
}

/// Why a live snapshot could not start.
pub(super) enum LiveStart {
    /// Not possible for this VM or on this host: take it paused (nothing was changed).
    Unavailable(String),
    Failed(SnapshotVmError),
}

impl VmCore {
    /// Why this snapshot cannot be live, if it cannot.
    pub(super) fn live_refusal(&self, diff: bool, lineage: &Lineage) -> Option<String> {
        if diff {
            return Some("diff snapshots are taken paused (they write only recent pages)".into());
        }
        match lineage.origin {
            MemoryOrigin::Booted => {}
            MemoryOrigin::Restored(_) => {
                return Some(
                    "a restored VM's memory is mapped from its snapshot file, which userfaultfd \
                     cannot write-protect"
                        .into(),
                )
            }
            MemoryOrigin::Fetched => {
                return Some("a lazily restored VM's memory is still served by userfaultfd".into())
            }
        }
        if crate::memory::shared_memory_file(&self.memory).is_some() {
            return Some(
                "file-backed guest RAM (--mem-dir) is linked into the snapshot, not copied".into(),
            );
        }
        None
    }

    /// Guest still running: protects its memory and starts tracking its writes.
    pub(super) fn prepare_live(
        &self,
        dir: &Path,
        target: TargetPolicy,
    ) -> Result<PreparedLive, LiveStart> {
        let resident = self.pages_holding_data().map_err(LiveStart::Unavailable)?;
        let source = MemorySource::from_guest_memory(&self.memory)
            .map_err(|e| LiveStart::Failed(e.into()))?;
        snapshot::prepare_live_snapshot(
            dir,
            &source,
            &resident,
            LiveOptions {
                on_thread_start: Arc::new(crate::seccomp::snapshot_writer_hook(self.seccomp)),
                keep_alive: Box::new(self.memory.clone()),
                replace: target.replace,
                companions: target.companions,
                sync: false,
            },
        )
        .map_err(|e| match e {
            snapshot::SnapshotError::LiveUnsupported(reason) => LiveStart::Unavailable(reason),
            other => LiveStart::Failed(other.into()),
        })
    }

    /// Pauses the guest (if it runs) for its state and the last protections, resumes it, and
    /// waits for the memory file.
    pub(super) fn take_live(
        &self,
        prepared: PreparedLive,
        dir: &Path,
        lineage: &mut Lineage,
    ) -> Result<LiveTaken, SnapshotVmError> {
        let started = Instant::now();
        let was_running = self.run_state() == super::error::RunState::Running;
        if was_running {
            self.pause()?;
        }
        let paused_at = Instant::now();
        let started_live = self.start_paused(prepared);
        let paused = if was_running {
            let paused = paused_at.elapsed();
            self.resume()?;
            paused
        } else {
            Duration::ZERO
        };
        let live = started_live?;
        match live.finish() {
            Ok((manifest, stats)) => {
                lineage.last_snapshot = Some(dir.to_path_buf());
                tracing::info!(
                    paused_us = paused.as_micros() as u64,
                    pages = stats.pages_written,
                    reprotected = stats.pages_reprotected,
                    saved_on_fault = stats.pages_saved_on_fault,
                    "live snapshot written in {:?}",
                    started.elapsed()
                );
                Ok(LiveTaken { manifest, paused })
            }
            Err(e) => {
                // The dirty log was reset at the pause: a diff against the previous snapshot
                // would miss what the guest wrote before it. The next snapshot must be full.
                lineage.last_snapshot = None;
                Err(e.into())
            }
        }
    }

    /// The paused part: state, residency, the last protections, the dirty log from here on.
    fn start_paused(
        &self,
        prepared: PreparedLive,
    ) -> Result<LiveSnapshot<VmSnapshotState>, SnapshotVmError> {
        let t0 = Instant::now();
        let state = self.capture_state()?;
        let t1 = Instant::now();
        let resident = self
            .pages_holding_data()
            .map_err(|e| SnapshotVmError::Snapshot(snapshot::SnapshotError::LiveFailed(e)))?;
        let t2 = Instant::now();
        let live = prepared.start(state, &resident, &self.snapshot_meta())?;
        let t3 = Instant::now();
        // The guest's writes from here on belong to the next diff.
        self.start_dirty_log()?;
        tracing::debug!(
            "live snapshot pause: state {:?}, residency {:?}, protect {:?}, dirty log {:?}",
            t1 - t0,
            t2 - t1,
            t3 - t2,
            t3.elapsed()
        );
        Ok(live)
    }

    /// The pages holding data, per region, as the residency check sees them now. Live
    /// snapshots need an exact answer: a page missed here and written later would be saved with
    /// its new contents.
    fn pages_holding_data(&self) -> Result<Vec<PageBitmap>, String> {
        memory_residency::regions_pages(&self.memory, Method::for_this_host())
            .map_err(|e| format!("cannot tell which guest pages hold data: {e}"))
    }
}
