//! Snapshots of a running VM and restore into a new one.
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
//! Restoring is construction: a new KVM VM, memory mapped from the file (private, lazy,
//! copy-on-write) or copied, irqchip and vCPUs set from the saved state, devices built from
//! their saved state with host resources (disks, TAPs) taken from the restore options.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::device_manager::VirtioKind;
use crate::host::{self, HostKind};
use crate::hypervisor::state::{
    complete_pending_io, restore_vcpu, restore_vm, save_vcpu, save_vm, StateError, VcpuState,
    VmState,
};
use crate::vm::{ControlError, RunState, VmCore};
use devices::legacy::SerialState;
use devices::persist::Persist;
use devices::virtio::mmio::MmioTransportState;
use snapshot::{
    HostInfo, MemorySource, MemoryStorage, PageBitmap, PageSelection, SnapshotMeta, TargetPolicy,
    WriteOptions,
};

/// A virtio device's slot and state.
#[derive(Clone, Serialize, Deserialize)]
pub struct SavedVirtio {
    pub kind: VirtioKind,
    pub irq: u32,
    pub mmio_base: u64,
    pub transport: MmioTransportState,
    /// The vsock device's own state (connections are not saved: restore resets them).
    #[serde(default)]
    pub vsock: Option<devices::virtio::vsock::VsockState>,
}

/// Everything in `state.bin`.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmSnapshotState {
    pub vcpu_count: u8,
    pub mem_mib: u64,
    pub cmdline: String,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialState,
    pub virtio: Vec<SavedVirtio>,
}

impl VmSnapshotState {
    /// Checks that the saved state is one this VMM could have written, and that it agrees with
    /// its manifest, before anything is built from it: vCPU count (within limits, the same in
    /// the manifest and in the state, one saved state each), memory size and layout, and each
    /// virtio device's slot (MMIO window inside the device area, aligned, not shared; IRQ a
    /// device IRQ, not shared; vsock state present exactly for the vsock device). The error
    /// names the first disagreement.
    pub fn check_consistent(&self, manifest: &snapshot::Manifest) -> Result<(), String> {
        use crate::boot::layout::{
            ram_ranges, FIRST_DEVICE_IRQ, IOAPIC_ADDR, IOAPIC_PINS, VIRTIO_MMIO_BASE,
        };
        use devices::virtio::mmio::MMIO_WINDOW_SIZE;

        let vcpus = self.vcpu_count;
        if vcpus == 0 || vcpus > crate::vm::MAX_VCPUS {
            return Err(format!(
                "{vcpus} vCPUs (this VMM runs 1 to {})",
                crate::vm::MAX_VCPUS
            ));
        }
        if manifest.vcpus != u32::from(vcpus) {
            return Err(format!(
                "the manifest says {} vCPUs, the state {vcpus}",
                manifest.vcpus
            ));
        }
        if self.vcpus.len() != usize::from(vcpus) {
            return Err(format!(
                "{} saved vCPU states for {vcpus} vCPUs",
                self.vcpus.len()
            ));
        }
        let mem_bytes = self
            .mem_mib
            .checked_mul(1 << 20)
            .filter(|b| *b == manifest.memory_size)
            .ok_or_else(|| {
                format!(
                    "the state has {} MiB of memory, the manifest {} bytes",
                    self.mem_mib, manifest.memory_size
                )
            })?;
        let expected: Vec<(u64, u64)> = ram_ranges(mem_bytes);
        let saved: Vec<(u64, u64)> = manifest
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        if saved != expected {
            return Err(format!(
                "memory regions {saved:x?} are not this VMM's layout for {} MiB ({expected:x?})",
                self.mem_mib
            ));
        }
        let mut windows = std::collections::BTreeSet::new();
        let mut irqs = std::collections::BTreeSet::new();
        let mut vsock_devices = 0;
        for (index, device) in self.virtio.iter().enumerate() {
            let base = device.mmio_base;
            let in_area = base >= VIRTIO_MMIO_BASE
                && base
                    .checked_add(MMIO_WINDOW_SIZE)
                    .is_some_and(|end| end <= IOAPIC_ADDR);
            if !in_area || base % MMIO_WINDOW_SIZE != 0 || !windows.insert(base) {
                return Err(format!(
                    "virtio device {index}: MMIO window {base:#x} is outside the device area, \
                     unaligned or shared"
                ));
            }
            if !(FIRST_DEVICE_IRQ..IOAPIC_PINS).contains(&device.irq) || !irqs.insert(device.irq) {
                return Err(format!(
                    "virtio device {index}: IRQ {} is not a free device IRQ ({FIRST_DEVICE_IRQ} \
                     to {})",
                    device.irq,
                    IOAPIC_PINS - 1
                ));
            }
            let is_vsock = matches!(device.kind, VirtioKind::Vsock { .. });
            if is_vsock != device.vsock.is_some() {
                return Err(format!(
                    "virtio device {index}: vsock state {} a {:?} device",
                    if is_vsock {
                        "missing for"
                    } else {
                        "attached to"
                    },
                    device.kind
                ));
            }
            vsock_devices += usize::from(is_vsock);
        }
        if vsock_devices > 1 {
            return Err(format!("{vsock_devices} vsock devices (at most one)"));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotVmError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("a diff snapshot needs a previous snapshot of this VM to be its parent")]
    NoParent,
    #[error("a diff snapshot needs dirty-page tracking, which is off for this VM")]
    NoDirtyLog,
    #[error("turning on KVM's dirty log failed: {0}")]
    EnableDirtyLog(crate::hypervisor::HypervisorError),
    #[error("reading KVM's dirty log failed: {0}")]
    DirtyLog(kvm_ioctls::Error),
    #[error("{0} must be an absolute path")]
    RelativeDir(PathBuf),
    #[error("after linking guest memory into the snapshot, remapping it copy-on-write failed (the snapshot was removed): {0}")]
    Remap(snapshot::SnapshotError),
}

/// Where a VM's memory came from: it decides how a full snapshot picks pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryOrigin {
    Booted,
    Restored(PathBuf),
}

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
}

/// The host facts a snapshot records and a restore checks.
pub fn host_info(host: HostKind) -> HostInfo {
    let kind = match host {
        HostKind::HardwareKvm { vendor } => format!("kvm-{vendor:?}").to_lowercase(),
        HostKind::Pvm {
            emulates_ring0: true,
        } => "kvm-pvm-emulated".to_string(),
        HostKind::Pvm {
            emulates_ring0: false,
        } => "kvm-pvm".to_string(),
    };
    HostInfo {
        kind,
        paging_levels: host::host_paging_levels(),
        cpu_features: host_cpu_flags(),
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

    fn capture_state(&self) -> Result<VmSnapshotState, SnapshotVmError> {
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
        let serial = self
            .devices
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save();
        let virtio = self
            .devices
            .virtio
            .iter()
            .map(|slot| SavedVirtio {
                vsock: match slot.kind {
                    VirtioKind::Vsock { .. } => self
                        .devices
                        .vsock
                        .as_ref()
                        .map(|v| v.lock().unwrap_or_else(|e| e.into_inner()).save()),
                    _ => None,
                },
                kind: slot.kind.clone(),
                irq: slot.irq,
                mmio_base: slot.mmio_base,
                transport: slot
                    .transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .save(),
            })
            .collect();
        Ok(VmSnapshotState {
            vcpu_count: self.vcpu_count,
            mem_mib: self.mem_mib,
            cmdline: self.cmdline.clone(),
            vm,
            vcpus,
            serial,
            virtio,
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
        if !dir.is_absolute() {
            return Err(SnapshotVmError::RelativeDir(dir.to_path_buf()));
        }
        // Before the dirty log is read (and reset): a refused target must not cost the next
        // diff the pages dirtied since the last snapshot.
        snapshot::check_snapshot_target(dir, target)?;
        let started = std::time::Instant::now();
        let was_running = self.run_state() == RunState::Running;
        if was_running {
            self.pause()?;
        }
        let result = self.snapshot_paused(dir, diff, target);
        if was_running {
            self.resume()?;
        }
        let (manifest, memory) = result?;
        Ok(SnapshotOutcome {
            dir: dir.to_path_buf(),
            diff,
            snapshot_id: manifest.snapshot_id.to_string(),
            parent_id: manifest.parent.as_ref().map(|p| p.id.to_string()),
            pages_written: manifest.pages.written,
            memory,
            duration: started.elapsed(),
        })
    }

    fn snapshot_paused(
        &self,
        dir: &Path,
        diff: bool,
        target: TargetPolicy,
    ) -> Result<(snapshot::Manifest, MemoryStorage), SnapshotVmError> {
        let mut lineage = self.lineage.lock().unwrap_or_else(|e| e.into_inner());
        let state = self.capture_state()?;
        let source = MemorySource::from_guest_memory(&self.memory)?;
        let dirty = if self.dirty_log.load(std::sync::atomic::Ordering::SeqCst) {
            Some(self.take_dirty_pages()?)
        } else {
            None
        };
        let meta = SnapshotMeta {
            vcpus: u32::from(self.vcpu_count),
            kernel_id: self.kernel_id.clone(),
            rootfs_id: self.rootfs_id(),
            host: host_info(self.host),
        };
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
                    },
                )?;
                tracing::debug!(memory = %taken.memory, "snapshot of file-backed guest RAM");
                if taken.memory == MemoryStorage::Linked {
                    self.freeze_linked_memory(&file, dir, &mut lineage)?;
                }
                (taken.manifest, taken.memory)
            }
            None => (
                self.write_selected(dir, diff, target, &state, &source, dirty, &meta, &lineage)?,
                MemoryStorage::Written,
            ),
        };
        lineage.last_snapshot = Some(dir.to_path_buf());
        // From now on diffs against this snapshot need the guest's writes: start logging them
        // (still paused, so nothing is missed). The VMM's own writes were reset just above.
        if !self.dirty_log.load(std::sync::atomic::Ordering::SeqCst) {
            self.kvm_vm
                .set_dirty_logging(&self.memory, true)
                .map_err(SnapshotVmError::EnableDirtyLog)?;
            let _ = snapshot::take_vmm_dirty_pages(&self.memory);
            self.dirty_log
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok((manifest, storage))
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
                MemoryOrigin::Restored(_) => PageSelection::NonZero,
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
            },
        )?)
    }

    fn rootfs_id(&self) -> String {
        self.devices
            .virtio
            .iter()
            .find_map(|s| match &s.kind {
                VirtioKind::Block { path, .. } => Some(path.display().to_string()),
                _ => None,
            })
            .unwrap_or_default()
    }
}

/// Snapshot bookkeeping of one VM.
#[derive(Debug)]
pub struct Lineage {
    pub origin: MemoryOrigin,
    pub last_snapshot: Option<PathBuf>,
}

/// Restores each vCPU's state into freshly created vCPU fds.
pub(crate) fn restore_vcpus(
    vm: &crate::hypervisor::Vm,
    states: &[VcpuState],
) -> Result<Vec<kvm_ioctls::VcpuFd>, SnapshotVmError> {
    let mut fds = Vec::with_capacity(states.len());
    for (index, state) in states.iter().enumerate() {
        let index = u8::try_from(index)
            .map_err(|_| StateError::InvalidVmState(format!("{} vCPUs saved", states.len())))?;
        let fd = vm
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|source| StateError::VcpuIoctl {
                vcpu: index,
                ioctl: "KVM_CREATE_VCPU",
                source,
            })?;
        restore_vcpu(&fd, index, state)?;
        fds.push(fd);
    }
    Ok(fds)
}

pub(crate) fn restore_vm_state(
    vm: &crate::hypervisor::Vm,
    state: &VmState,
) -> Result<(), SnapshotVmError> {
    Ok(restore_vm(&vm.fd, state)?)
}
