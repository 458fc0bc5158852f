//! Live snapshots of a running VM (`SnapshotOptions::live`): the guest is paused only while its
//! vCPU and device state are read and its memory is write-protected; the memory file is then
//! written while it runs (`snapshot::start_live_snapshot`: pages the guest writes first are
//! saved first). Same files as a paused snapshot taken at the pause; same restore.
//!
//! Only a booted VM's anonymous memory can be write-protected: a restored VM's memory is a
//! private mapping of a snapshot file and a `--mem-dir` VM's is a shared file (its full snapshot
//! is a hard link, O(1) already); diffs are small. Those are taken paused, and the outcome says
//! why (`live_unavailable`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshot::{LiveOptions, LiveSnapshot, MemorySource, MemoryStorage, PageBitmap, TargetPolicy};

use super::core::{Lineage, MemoryOrigin, VmCore};
use super::error::SnapshotVmError;
use super::snapshot::SnapshotOutcome;
use super::state::VmSnapshotState;
use crate::memory_residency::{self, Method};

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

    /// Still paused: saves state, write-protects memory and starts the background write.
    pub(super) fn start_live(
        &self,
        dir: &Path,
        target: TargetPolicy,
    ) -> Result<LiveSnapshot<VmSnapshotState>, LiveStart> {
        let t0 = Instant::now();
        let selection = self.pages_holding_data().map_err(LiveStart::Unavailable)?;
        let t1 = Instant::now();
        let state = self.capture_state().map_err(LiveStart::Failed)?;
        let t2 = Instant::now();
        let source = MemorySource::from_guest_memory(&self.memory)
            .map_err(|e| LiveStart::Failed(e.into()))?;
        let live = snapshot::start_live_snapshot(
            dir,
            state,
            &source,
            &selection,
            &self.snapshot_meta(),
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
        })?;
        let t3 = Instant::now();
        // The guest's writes from here on belong to the next diff.
        self.start_dirty_log().map_err(LiveStart::Failed)?;
        tracing::info!(
            "live snapshot pause: residency {:?}, state {:?}, protect {:?}, dirty log {:?}",
            t1 - t0,
            t2 - t1,
            t3 - t2,
            t3.elapsed()
        );
        Ok(live)
    }

    /// Lets the guest run again and waits for the memory file.
    pub(super) fn finish_live(
        &self,
        live: LiveSnapshot<VmSnapshotState>,
        dir: &Path,
        lineage: &mut Lineage,
        was_running: bool,
        started: Instant,
    ) -> Result<SnapshotOutcome, SnapshotVmError> {
        let paused = if was_running {
            let paused = started.elapsed();
            self.resume()?;
            paused
        } else {
            Duration::ZERO
        };
        match live.finish() {
            Ok((manifest, stats)) => {
                lineage.last_snapshot = Some(dir.to_path_buf());
                tracing::info!(
                    paused_us = paused.as_micros() as u64,
                    pages = stats.pages_written,
                    saved_on_fault = stats.pages_saved_on_fault,
                    "live snapshot written in {:?}",
                    started.elapsed()
                );
                Ok(SnapshotOutcome {
                    dir: dir.to_path_buf(),
                    diff: false,
                    snapshot_id: manifest.snapshot_id.to_string(),
                    parent_id: None,
                    pages_written: manifest.pages.written,
                    memory: MemoryStorage::Written,
                    duration: started.elapsed(),
                    paused,
                    live: true,
                    live_unavailable: None,
                })
            }
            Err(e) => {
                // The dirty log was reset at the pause: a diff against the previous snapshot
                // would miss what the guest wrote before it. The next snapshot must be full.
                lineage.last_snapshot = None;
                Err(e.into())
            }
        }
    }

    /// The pages holding data, per region, as the residency check sees them now. Live
    /// snapshots need an exact answer: a page missed here and written later would be saved with
    /// its new contents.
    fn pages_holding_data(&self) -> Result<Vec<PageBitmap>, String> {
        let method = Method::for_this_host();
        vm_memory::GuestMemoryBackend::iter(&self.memory)
            .map(|region| {
                let len = vm_memory::GuestMemoryRegion::len(region) as usize;
                memory_residency::region_pages(region.as_ptr() as usize, len, method)
                    .map_err(|e| format!("cannot tell which guest pages hold data: {e}"))
            })
            .collect()
    }
}
