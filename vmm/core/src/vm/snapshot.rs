//! Snapshots of a running VM (`VmCore::snapshot`).
//!
//! Saving: pause, complete each vCPU's pending I/O and read its state on its own thread, read
//! the irqchip/PIT/clock, save each device next to its model, then write memory through the
//! `snapshot` crate. Which pages: a VM booted from scratch writes the pages it ever touched
//! (`memory_residency`: `mincore`, or `/proc/self/pagemap` on a host with swap, so that
//! swapped-out pages are not lost); a diff writes KVM's dirty log plus the VMM's own writes
//! since the previous snapshot; a VM that was itself restored from a file writes its non-zero
//! pages (its untouched pages come from the file, not zeros).
//!
//! A booted VM whose RAM is a shared mapping of an unnamed file (`--mem-dir`) takes a full
//! snapshot by hard-linking that file as `memory.bin` (same file system; otherwise it copies the
//! file's data pages), then, still paused, remaps its RAM copy-on-write over the now-frozen
//! file: from there on it is exactly a VM restored from that snapshot with private memory.
//!

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::host::{self, HostKind};
use crate::hypervisor::state::{complete_pending_io, save_vcpu, save_vm};
use snapshot::{
    HostInfo, MemorySource, MemoryStorage, PageBitmap, PageSelection, SnapshotMeta, TargetPolicy,
    WriteOptions,
};

use super::core::{Lineage, MemoryOrigin, VmCore};
use super::error::{RunState, SnapshotVmError};
use super::state::VmSnapshotState;

/// Result of one snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotOutcome {
    pub dir: PathBuf,
    pub diff: bool,
    pub snapshot_id: String,
    pub parent_id: Option<String>,
    pub pages_written: u64,
    /// Whether `memory.bin` is the VM's own memory file, linked (O(1)), or a written copy.
    pub memory: MemoryStorage,
    pub duration: std::time::Duration,
    /// How long this call kept the guest paused (zero if it was paused already).
    pub paused: std::time::Duration,
    /// Memory was written while the guest ran ([`SnapshotOptions::live`]).
    pub live: bool,
    /// Why a live snapshot that was asked for was taken paused instead.
    pub live_unavailable: Option<String>,
    /// The state written (paused snapshots), for a restore of this snapshot in this process
    /// (`RestoreOptions::known_state`: no `state.bin` to read and decode).
    pub state: Option<Arc<snapshot::DecodedState<VmSnapshotState>>>,
}

/// How to take a snapshot ([`VmCore::snapshot_with`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotOptions {
    /// Only the pages written since the previous snapshot, which becomes the parent.
    pub diff: bool,
    pub target: TargetPolicy,
    /// Pause the guest only to save vCPU and device state and write-protect its memory; write
    /// memory while it runs (`live_snapshot`). Full snapshots of a booted VM's anonymous memory;
    /// anything else is taken paused, and the outcome says why.
    pub live: bool,
}

/// The host facts a snapshot records and a restore checks.
pub fn host_info(host: HostKind) -> HostInfo {
    HostInfo {
        kind: host_kind_name(host),
        paging_levels: host::host_paging_levels(),
        cpu_features: host_cpu_flags(),
    }
}

/// How a snapshot's manifest names the host kind.
pub(super) fn host_kind_name(host: HostKind) -> String {
    match host {
        HostKind::HardwareKvm { vendor } => format!("kvm-{vendor:?}").to_lowercase(),
        HostKind::Pvm {
            emulates_ring0: true,
        } => "kvm-pvm-emulated".to_string(),
        HostKind::Pvm {
            emulates_ring0: false,
        } => "kvm-pvm".to_string(),
    }
}

fn host_cpu_flags() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("flags"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, flags)| flags.split_whitespace().map(str::to_string).collect())
        })
        .unwrap_or_default()
}

impl VmCore {
    /// KVM's dirty log (read and reset) OR'ed with the VMM's own writes (read and reset).
    fn take_dirty_pages(&self) -> Result<Vec<PageBitmap>, SnapshotVmError> {
        let mut bitmaps = snapshot::take_vmm_dirty_pages(&self.memory);
        for (slot, bitmap) in self.kvm_vm.memory_slots.iter().zip(bitmaps.iter_mut()) {
            let words = self
                .kvm_vm
                .fd
                .get_dirty_log(slot.slot, slot.size as usize)
                .map_err(SnapshotVmError::DirtyLog)?;
            bitmap.or_words(&words);
        }
        Ok(bitmaps)
    }

    pub(super) fn capture_state(&self) -> Result<VmSnapshotState, SnapshotVmError> {
        let mut vcpus = Vec::with_capacity(usize::from(self.vcpu_count));
        let msr_list = self
            .msr_indices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get()?;
        for index in 0..self.vcpu_count {
            let msrs = msr_list.clone();
            let state = self.with_vcpu(index, move |fd| {
                complete_pending_io(fd, index)?;
                save_vcpu(fd, index, &msrs)
            })??;
            vcpus.push(state);
        }
        let vm = save_vm(&self.kvm_vm.fd, self.kvm_vm.pit)?;
        let devices = self.devices.save();
        Ok(VmSnapshotState {
            vcpu_count: self.vcpu_count,
            mem_mib: self.mem_mib,
            cmdline: self.cmdline.clone(),
            vm,
            vcpus,
            devices,
        })
    }

    /// Writes a snapshot of this VM to `dir`. A running VM is paused for the duration. `dir`
    /// must be missing or an empty directory, or hold a snapshot that `target` allows replacing.
    pub fn snapshot(
        &self,
        dir: &Path,
        diff: bool,
        target: TargetPolicy,
    ) -> Result<SnapshotOutcome, SnapshotVmError> {
        self.snapshot_with(
            dir,
            SnapshotOptions {
                diff,
                target,
                live: false,
            },
        )
    }

    /// [`VmCore::snapshot`] with every option, live snapshots included.
    pub fn snapshot_with(
        &self,
        dir: &Path,
        options: SnapshotOptions,
    ) -> Result<SnapshotOutcome, SnapshotVmError> {
        let SnapshotOptions { diff, target, live } = options;
        if !dir.is_absolute() {
            return Err(SnapshotVmError::RelativeDir(dir.to_path_buf()));
        }
        // Before the dirty log is read (and reset): a refused target must not cost the next
        // diff the pages dirtied since the last snapshot.
        snapshot::check_snapshot_target(dir, target)?;
        let started = std::time::Instant::now();
        let mut lineage = self.lineage.lock().unwrap_or_else(|e| e.into_inner());
        let mut live_unavailable = None;
        if live {
            // The memory is protected while the guest still runs (the slow part); the pause
            // comes after.
            match self.live_refusal(diff, &lineage) {
                None => match self.prepare_live(dir, target) {
                    Ok(prepared) => {
                        let taken = self.take_live(prepared, dir, &mut lineage)?;
                        self.metrics
                            .snapshot()
                            .record_create(false, started.elapsed());
                        return Ok(SnapshotOutcome {
                            dir: dir.to_path_buf(),
                            diff: false,
                            snapshot_id: taken.manifest.snapshot_id.to_string(),
                            parent_id: None,
                            pages_written: taken.manifest.pages.written,
                            memory: MemoryStorage::Written,
                            duration: started.elapsed(),
                            paused: taken.paused,
                            live: true,
                            live_unavailable: None,
                            state: None,
                        });
                    }
                    Err(super::live_snapshot::LiveStart::Unavailable(reason)) => {
                        live_unavailable = Some(reason)
                    }
                    Err(super::live_snapshot::LiveStart::Failed(e)) => return Err(e),
                },
                Some(reason) => live_unavailable = Some(reason),
            }
            if let Some(reason) = &live_unavailable {
                tracing::info!("live snapshot not possible, taking it paused: {reason}");
            }
        }
        let pause_started = std::time::Instant::now();
        let was_running = self.run_state() == RunState::Running;
        if was_running {
            self.pause()?;
        }
        let result = self.snapshot_paused(dir, diff, target, &mut lineage);
        drop(lineage);
        let paused = pause_started.elapsed();
        if was_running {
            self.resume()?;
        }
        let (manifest, memory, state) = result?;
        self.metrics
            .snapshot()
            .record_create(diff, started.elapsed());
        Ok(SnapshotOutcome {
            dir: dir.to_path_buf(),
            diff,
            snapshot_id: manifest.snapshot_id.to_string(),
            parent_id: manifest.parent.as_ref().map(|p| p.id.to_string()),
            pages_written: manifest.pages.written,
            memory,
            duration: started.elapsed(),
            paused: if was_running {
                paused
            } else {
                std::time::Duration::ZERO
            },
            live: false,
            live_unavailable,
            state: Some(Arc::new(snapshot::DecodedState::written(
                manifest.snapshot_id,
                state,
            ))),
        })
    }

    fn snapshot_paused(
        &self,
        dir: &Path,
        diff: bool,
        target: TargetPolicy,
        lineage: &mut Lineage,
    ) -> Result<(snapshot::Manifest, MemoryStorage, VmSnapshotState), SnapshotVmError> {
        let state = self.capture_state()?;
        let source = MemorySource::from_guest_memory(&self.memory)?;
        let dirty = if self.dirty_log.load(std::sync::atomic::Ordering::SeqCst) {
            Some(self.take_dirty_pages()?)
        } else {
            None
        };
        // Before any page is read for the snapshot (reading makes pages present).
        let working_set = self.working_set(&lineage.origin, diff, &source, dirty.as_deref());
        let meta = self.snapshot_meta();
        // A booted VM's memory file holds exactly its memory; once linked (or for a diff) the
        // pages are chosen as for any other VM.
        let memory_file = match (&lineage.origin, diff) {
            (MemoryOrigin::Booted, false) => crate::memory::shared_memory_file(&self.memory),
            _ => None,
        };
        let (manifest, storage) = match memory_file {
            Some(file) => {
                let taken = snapshot::write_snapshot_from_file(
                    dir,
                    &state,
                    &source,
                    &file,
                    &meta,
                    &WriteOptions {
                        parent: None,
                        sync: false,
                        replace: target.replace,
                        companions: target.companions,
                        working_set: None,
                    },
                )?;
                tracing::debug!(memory = %taken.memory, "snapshot of file-backed guest RAM");
                if taken.memory == MemoryStorage::Linked {
                    self.freeze_linked_memory(&file, dir, lineage)?;
                }
                (taken.manifest, taken.memory)
            }
            None => (
                self.write_selected(
                    dir,
                    diff,
                    target,
                    &state,
                    &source,
                    dirty,
                    &meta,
                    lineage,
                    working_set.as_ref(),
                )?,
                MemoryStorage::Written,
            ),
        };
        lineage.last_snapshot = Some(dir.to_path_buf());
        self.start_dirty_log()?;
        Ok((manifest, storage, state))
    }

    /// From now on diffs against the snapshot just taken need the guest's writes: start
    /// logging them (still paused, so nothing is missed). The VMM's own writes were reset with
    /// the dirty log read, or are reset here.
    pub(super) fn start_dirty_log(&self) -> Result<(), SnapshotVmError> {
        if !self.dirty_log.load(std::sync::atomic::Ordering::SeqCst) {
            self.kvm_vm
                .set_dirty_logging(&self.memory, true)
                .map_err(SnapshotVmError::EnableDirtyLog)?;
            let _ = snapshot::take_vmm_dirty_pages(&self.memory);
            self.dirty_log
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    pub(super) fn snapshot_meta(&self) -> SnapshotMeta {
        SnapshotMeta {
            vcpus: u32::from(self.vcpu_count),
            kernel_id: self.kernel_id.clone(),
            rootfs_id: self.rootfs_id(),
            host: host_info(self.host),
        }
    }

    /// The guest's memory file is now the snapshot's `memory.bin`: before the guest runs again,
    /// make its RAM copy-on-write over that file so the snapshot never changes. KVM follows the
    /// new mappings through its MMU notifiers (same host addresses, nothing to re-register).
    fn freeze_linked_memory(
        &self,
        file: &std::fs::File,
        dir: &Path,
        lineage: &mut Lineage,
    ) -> Result<(), SnapshotVmError> {
        let started = std::time::Instant::now();
        // Whatever happens below, the file no longer mirrors guest RAM: later full snapshots
        // pick pages like those of a restored VM.
        lineage.origin = MemoryOrigin::Restored(dir.to_path_buf());
        if let Err(e) = snapshot::remap_private(&self.memory, file) {
            // Regions still shared would write into the snapshot: it cannot be kept.
            // Only the files the snapshot wrote: never a whole tree.
            if let Err(remove) = snapshot::remove_snapshot_dir(dir) {
                tracing::warn!("cannot remove {}: {remove}", dir.display());
            }
            return Err(SnapshotVmError::Remap(e));
        }
        tracing::debug!(
            "guest RAM remapped copy-on-write over {} in {:?}",
            dir.display(),
            started.elapsed()
        );
        Ok(())
    }

    /// Writes a snapshot whose memory file is a copy of the selected pages.
    #[allow(clippy::too_many_arguments)]
    fn write_selected(
        &self,
        dir: &Path,
        diff: bool,
        target: TargetPolicy,
        state: &VmSnapshotState,
        source: &MemorySource<'_>,
        dirty: Option<Vec<PageBitmap>>,
        meta: &SnapshotMeta,
        lineage: &Lineage,
        working_set: Option<&PageBitmap>,
    ) -> Result<snapshot::Manifest, SnapshotVmError> {
        let parent: Option<PathBuf>;
        let selection_pages: Vec<PageBitmap>;
        let selection = if diff {
            parent = Some(
                lineage
                    .last_snapshot
                    .clone()
                    .ok_or(SnapshotVmError::NoParent)?,
            );
            selection_pages = dirty.ok_or(SnapshotVmError::NoDirtyLog)?;
            PageSelection::Dirty(&selection_pages)
        } else {
            parent = None;
            match &lineage.origin {
                MemoryOrigin::Booted => {
                    selection_pages = crate::memory_residency::pages_with_data(&self.memory);
                    PageSelection::Dirty(&selection_pages)
                }
                MemoryOrigin::Restored(_) | MemoryOrigin::Fetched => PageSelection::NonZero,
            }
        };
        Ok(snapshot::write_snapshot(
            dir,
            state,
            source,
            selection,
            meta,
            &WriteOptions {
                parent: parent.as_deref(),
                sync: false,
                replace: target.replace,
                companions: target.companions,
                working_set,
            },
        )?)
    }

    /// The pages a lazy restore of this snapshot should fetch first, in memory-file numbering:
    /// a diff's own pages (written since its parent); for a full snapshot of a restored VM the
    /// pages it touched since its wake (present in the VMM's page tables: the guest reached
    /// them through KVM); of a lazily restored one the pages it faulted before they streamed
    /// in. A booted VM's is all its memory: none is recorded.
    fn working_set(
        &self,
        origin: &MemoryOrigin,
        diff: bool,
        source: &MemorySource<'_>,
        dirty: Option<&[PageBitmap]>,
    ) -> Option<PageBitmap> {
        let layout = source.layout();
        let total = layout.last().map(|r| r.first_page() + r.page_count())?;
        let per_region: Vec<PageBitmap> = if diff {
            dirty?.to_vec()
        } else {
            match origin {
                MemoryOrigin::Booted => return None,
                MemoryOrigin::Fetched => {
                    return self.lazy_memory.as_ref().map(|l| l.demand_pages())
                }
                MemoryOrigin::Restored(_) => crate::memory_residency::regions_pages(
                    &self.memory,
                    crate::memory_residency::Method::Pagemap,
                )
                .map_err(|e| tracing::debug!("no working set recorded: {e}"))
                .ok()?,
            }
        };
        let mut set = PageBitmap::new(total);
        for (region, pages) in layout.iter().zip(&per_region) {
            for (start, count) in pages.runs() {
                set.set_range(region.first_page() + start, count);
            }
        }
        Some(set)
    }

    fn rootfs_id(&self) -> String {
        self.devices
            .first_disk()
            .map(|path| path.display().to_string())
            .unwrap_or_default()
    }
}
