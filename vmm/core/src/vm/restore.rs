//! Restoring a VM from a snapshot directory (`Vm::restore`, `Vm::wake`): construction from the
//! saved state, checked against its manifest and this host before anything is built.

use std::sync::Arc;

use crate::device_manager::DeviceManager;
use crate::exit::ExitSink;
use crate::host;
use crate::hypervisor::state::{restore_vcpu, restore_vm, StateError, VcpuState};
use crate::hypervisor::{vcpu, Hypervisor, VmSetup};
use crate::reserved_ram::ReservedRam;

use super::build::{launch, metrics_or_new, Launch};
use super::config::{Console, LazyRestore, RestoreOptions};
use super::core::{MemoryOrigin, MsrList};
use super::error::{SnapshotVmError, VmError};
use super::lifecycle::Vm;
use super::shell::{create_vcpus, prespawn_restore_vcpus, HostFacts, ShellShape, VmShell};
use super::state::VmSnapshotState;

/// The log line `dormouse restore` prints once a restored VM's vCPUs run (with the time it
/// took); `dormouse bench snapshot` times restores up to it.
pub const RESTORED_MARKER: &str = "restored: vCPUs running";

impl Vm {
    /// Restores a VM from a snapshot directory, in this process, and lets it run.
    pub fn restore(mut options: RestoreOptions) -> Result<Self, VmError> {
        let load_started = std::time::Instant::now();
        let dir = absolute_dir(&options)?;
        let exit = Arc::new(ExitSink::default());
        let (loaded, lazy_memory) = match options.lazy.take() {
            None => (
                snapshot::load_snapshot_reusing::<VmSnapshotState>(
                    &dir,
                    options.memory,
                    options.known_state.as_deref(),
                )?,
                None,
            ),
            Some(lazy) => {
                let loaded = snapshot::load_snapshot_without_memory::<VmSnapshotState>(&dir)?;
                let served = start_lazy_memory(&loaded, lazy, &exit, options.seccomp)?;
                (loaded, Some(served))
            }
        };
        let origin = if lazy_memory.is_some() {
            MemoryOrigin::Fetched
        } else {
            MemoryOrigin::Restored(dir.clone())
        };
        let hv = Hypervisor::open()?;
        let host = check_restorable(
            &HostFacts::detect(hv.vendor),
            &loaded.manifest,
            &loaded.state,
            &dir,
        )?;
        let state = &loaded.state;
        // As a boot does (the count is checked by now).
        let early_vcpus = prespawn_restore_vcpus(state.vcpu_count, &exit, options.seccomp);

        let kvm_vm = hv.create_vm(
            &loaded.memory,
            VmSetup {
                // The guest keeps the devices it was saved with.
                pit: state.vm.pit.is_some(),
                dirty_log: options.dirty_log,
            },
        )?;
        let fds = create_vcpus(&kvm_vm, state.vcpu_count)?;
        restore_and_launch(Restored {
            options,
            host,
            loaded,
            origin,
            lazy_memory,
            exit,
            kvm_vm,
            fds,
            early_vcpus,
            load_started,
            reserved_ram: None,
        })
    }

    /// Restores a VM from a snapshot directory into `shell` (built for the snapshot's shape),
    /// and lets it run: as [`Vm::restore`] with [`snapshot::RestoreStrategy::Private`] memory,
    /// but the KVM VM, its memory slots, irqchip, vCPUs and vCPU threads are the shell's. The
    /// snapshot's memory is mapped at the host addresses the shell's memory slots already point
    /// at, which were left unmapped (`MAP_FIXED_NOREPLACE | MAP_PRIVATE`): KVM finds the pages
    /// there when a vCPU first touches them, and no existing mapping is replaced.
    ///
    /// A snapshot or options the shell does not fit (another shape, a lazy or copying restore)
    /// are refused before the shell is touched, and the error gives it back.
    pub fn restore_into(shell: VmShell, options: RestoreOptions) -> Result<Self, RestoreIntoError> {
        let load_started = std::time::Instant::now();
        let (dir, opened, host) = match check_shell_restore(&shell, &options) {
            Ok(checked) => checked,
            Err(error) => {
                return Err(RestoreIntoError {
                    error,
                    refused: Some(Box::new((shell, options))),
                })
            }
        };
        // From here on the shell is spent: an error drops it with whatever was mapped.
        let VmShell {
            mut ram,
            kvm_vm,
            fds,
            exit,
            early_vcpus,
            ..
        } = shell;
        let failed = |error: VmError| RestoreIntoError {
            error,
            refused: None,
        };
        let memory = ram.memory().map_err(|e| failed(e.into()))?;
        let loaded = opened
            .map_into_holes(&memory, &mut |region| ram.mark_mapped(region))
            .map_err(|e| failed(e.into()))?;
        drop(memory);
        restore_and_launch(Restored {
            options,
            host,
            loaded,
            origin: MemoryOrigin::Restored(dir),
            lazy_memory: None,
            exit,
            kvm_vm,
            fds,
            early_vcpus,
            load_started,
            reserved_ram: Some(ram),
        })
        .map_err(failed)
    }

    /// Restores a hibernated VM from `dir` with its saved devices, console output to `console`.
    pub fn wake(dir: &std::path::Path, console: Console) -> Result<Self, VmError> {
        let mut options = RestoreOptions::new(dir);
        options.console = console;
        Self::restore(options)
    }
}

/// A restore into a shell that failed (`Vm::restore_into`).
#[derive(thiserror::Error)]
#[error("{error}")]
pub struct RestoreIntoError {
    pub error: VmError,
    /// When the restore was refused before the shell was used: the shell, untouched, and the
    /// options, for another restore (`Vm::restore`, or another shell).
    pub refused: Option<Box<(VmShell, RestoreOptions)>>,
}

impl std::fmt::Debug for RestoreIntoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreIntoError")
            .field("error", &self.error)
            .field("refused", &self.refused.is_some())
            .finish()
    }
}

/// What `Vm::restore_into` checks before it touches the shell: the options, the snapshot
/// against this host, itself and the shell's shape. The snapshot, opened, and the host kind.
fn check_shell_restore(
    shell: &VmShell,
    options: &RestoreOptions,
) -> Result<
    (
        std::path::PathBuf,
        snapshot::OpenedSnapshot<VmSnapshotState>,
        host::HostKind,
    ),
    VmError,
> {
    if options.lazy.is_some() {
        return Err(VmError::ShellRefused("a lazy restore".into()));
    }
    if options.memory != snapshot::RestoreStrategy::Private {
        return Err(VmError::ShellRefused(format!(
            "memory restored by {:?}",
            options.memory
        )));
    }
    let dir = absolute_dir(options)?;
    let opened =
        snapshot::open_snapshot_reusing::<VmSnapshotState>(&dir, options.known_state.as_deref())?;
    let host = check_restorable(&shell.host, &opened.manifest, &opened.state, &dir)?;
    shell_fits(shell, &opened, options)?;
    Ok((dir, opened, host))
}

fn absolute_dir(options: &RestoreOptions) -> Result<std::path::PathBuf, VmError> {
    std::path::absolute(&options.dir)
        .map_err(|e| VmError::BadSnapshot(format!("{}: {e}", options.dir.display())))
}

/// Checks a snapshot against this host and against itself; the host it runs on.
fn check_restorable(
    facts: &HostFacts,
    manifest: &snapshot::Manifest,
    state: &VmSnapshotState,
    dir: &std::path::Path,
) -> Result<host::HostKind, VmError> {
    // The snapshot says whether the guest kernel was PVM-aware through its host kind.
    let guest_kind = if manifest.host.kind == "kvm-pvm" {
        host::GuestKernelKind::PvmAware
    } else {
        host::GuestKernelKind::Unmodified
    };
    let (host, info) = facts.for_guest(guest_kind);
    tracing::info!("host: {host}");
    snapshot::check_compatible(manifest, &info)?;
    state
        .check_consistent(manifest)
        .map_err(|reason| VmError::BadSnapshot(format!("{}: {reason}", dir.display())))?;
    Ok(host)
}

/// Whether a (consistent) snapshot and the restore's options fit `shell`'s shape.
fn shell_fits(
    shell: &VmShell,
    opened: &snapshot::OpenedSnapshot<VmSnapshotState>,
    options: &RestoreOptions,
) -> Result<(), VmError> {
    let wanted = ShellShape::of(&opened.state, options);
    if wanted != shell.shape {
        return Err(VmError::ShellMismatch {
            shell: format!("{:?}", shell.shape),
            wanted: format!("{wanted:?}"),
        });
    }
    // The same size gives the same layout today; the mapping checks it again region by region.
    if opened.layout().len() != shell.ram.region_count() {
        return Err(VmError::ShellMismatch {
            shell: format!("{} memory regions", shell.ram.region_count()),
            wanted: format!("{} memory regions", opened.layout().len()),
        });
    }
    Ok(())
}

/// A restore's pieces once its KVM VM, memory and vCPU fds exist.
struct Restored {
    options: RestoreOptions,
    host: host::HostKind,
    loaded: snapshot::LoadedSnapshot<VmSnapshotState>,
    origin: MemoryOrigin,
    lazy_memory: Option<snapshot::LazyMemory>,
    exit: Arc<ExitSink>,
    kvm_vm: crate::hypervisor::Vm,
    fds: Vec<kvm_ioctls::VcpuFd>,
    early_vcpus: Vec<vcpu::PendingVcpu>,
    load_started: std::time::Instant,
    /// A shell's RAM reservation, which owns the memory's mappings.
    reserved_ram: Option<ReservedRam>,
}

/// Loads the VM, device and vCPU state into a built VM and starts it (both restore paths).
fn restore_and_launch(parts: Restored) -> Result<Vm, VmError> {
    let Restored {
        mut options,
        host,
        loaded,
        origin,
        lazy_memory,
        exit,
        kvm_vm,
        fds,
        early_vcpus,
        load_started,
        reserved_ram,
    } = parts;
    let state = loaded.state;
    restore_vm(&kvm_vm.fd, &state.vm)?;

    let overrides = options.device_overrides();
    let (console_out, stdin_input) = options.console.into_parts();
    let metrics = metrics_or_new(options.metrics.take())?;
    let devices = DeviceManager::restore(
        &kvm_vm,
        &loaded.memory,
        console_out,
        exit.clone(),
        &state.devices,
        &overrides,
        metrics.clone(),
    )?;
    restore_vcpus(&fds, &state.vcpus)?;
    // The MSRs this snapshot carries are the ones the next snapshot saves.
    let msr_indices = MsrList::Known(
        state
            .vcpus
            .first()
            .map(|v| v.msrs.iter().map(|m| m.index).collect())
            .unwrap_or_default(),
    );
    launch(Launch {
        host,
        cmdline: state.cmdline.clone(),
        vcpu_count: state.vcpu_count,
        mem_mib: state.mem_mib,
        memory: loaded.memory,
        exit,
        devices,
        kvm_vm,
        fds,
        stdin_input,
        msr_indices,
        dirty_log: options.dirty_log,
        origin,
        lazy_memory,
        kernel_id: loaded.manifest.kernel_id.clone(),
        seccomp: options.seccomp,
        early_vcpus,
        metrics: metrics.clone(),
        reserved_ram,
    })
    .inspect(|_| metrics.snapshot().record_load(load_started.elapsed()))
}

/// Starts serving a lazy restore's memory: its threads install the store-fetch filter, and a
/// chunk that cannot be served ends the VM with the reason.
fn start_lazy_memory(
    loaded: &snapshot::LoadedSnapshot<VmSnapshotState>,
    lazy: LazyRestore,
    exit: &Arc<ExitSink>,
    seccomp: crate::seccomp::SeccompLevel,
) -> Result<snapshot::LazyMemory, VmError> {
    let sink = Arc::clone(exit);
    let options = snapshot::LazyOptions {
        fetchers: lazy.fetchers,
        working_set: lazy.working_set,
        on_fatal: Box::new(move |reason| {
            sink.report(crate::VmExit::Failed(format!(
                "lazy memory: {reason}: the guest's memory cannot be served"
            )));
        }),
        on_thread_start: Arc::new(crate::seccomp::store_fetch_hook(seccomp)),
    };
    Ok(snapshot::LazyMemory::start(
        &loaded.memory,
        &loaded.manifest.regions,
        lazy.source,
        options,
    )?)
}

/// Restores each vCPU's saved state into its fd (created bare, one per saved state).
fn restore_vcpus(fds: &[kvm_ioctls::VcpuFd], states: &[VcpuState]) -> Result<(), SnapshotVmError> {
    if fds.len() != states.len() {
        return Err(StateError::InvalidVmState(format!(
            "{} vCPUs saved, {} made",
            states.len(),
            fds.len()
        ))
        .into());
    }
    for (index, (fd, state)) in fds.iter().zip(states).enumerate() {
        let index = u8::try_from(index)
            .map_err(|_| StateError::InvalidVmState(format!("{} vCPUs saved", states.len())))?;
        restore_vcpu(fd, index, state)?;
    }
    Ok(())
}
