//! Restoring a VM from a snapshot directory (`Vm::restore`, `Vm::wake`): construction from the
//! saved state, checked against its manifest and this host before anything is built.

use std::sync::Arc;

use crate::device_manager::DeviceManager;
use crate::exit::ExitSink;
use crate::host;
use crate::hypervisor::state::{restore_vcpu, restore_vm, StateError, VcpuState};
use crate::hypervisor::{vcpu, Hypervisor, VmSetup};

use super::build::{launch, metrics_or_new, prespawn_vcpus, Launch};
use super::config::{Console, LazyRestore, RestoreOptions};
use super::core::{MemoryOrigin, MsrList};
use super::error::{SnapshotVmError, VmError};
use super::lifecycle::Vm;
use super::snapshot::host_info;
use super::state::VmSnapshotState;

/// The log line `dormouse restore` prints once a restored VM's vCPUs run (with the time it
/// took); `dormouse bench snapshot` times restores up to it.
pub const RESTORED_MARKER: &str = "restored: vCPUs running";

impl Vm {
    /// Restores a VM from a snapshot directory, in this process, and lets it run.
    pub fn restore(mut options: RestoreOptions) -> Result<Self, VmError> {
        let load_started = std::time::Instant::now();
        let dir = std::path::absolute(&options.dir)
            .map_err(|e| VmError::BadSnapshot(format!("{}: {e}", options.dir.display())))?;
        let overrides = options.device_overrides();
        let exit = Arc::new(ExitSink::default());
        let (loaded, lazy_memory) = match options.lazy.take() {
            None => (
                snapshot::load_snapshot::<VmSnapshotState>(&dir, options.memory)?,
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
        let state = loaded.state;
        let hv = Hypervisor::open()?;
        // The snapshot says whether the guest kernel was PVM-aware through its host kind.
        let guest_kind = if loaded.manifest.host.kind == "kvm-pvm" {
            host::GuestKernelKind::PvmAware
        } else {
            host::GuestKernelKind::Unmodified
        };
        let host = host::detect(std::path::Path::new("/sys"), hv.vendor, guest_kind);
        tracing::info!("host: {host}");
        snapshot::check_compatible(&loaded.manifest, &host_info(host))?;
        state
            .check_consistent(&loaded.manifest)
            .map_err(|reason| VmError::BadSnapshot(format!("{}: {reason}", dir.display())))?;
        // As a boot does (the count is checked by now): the vCPU threads install their filters
        // while the VM is rebuilt. The vsock datapath is not known yet; userspace (what a
        // hybrid socket needs) is the guess, and a vhost-kernel restore starts its threads at
        // launch instead.
        let early_vcpus = prespawn_vcpus(
            state.vcpu_count,
            &exit,
            vcpu::VcpuFilter {
                level: options.seccomp,
                vhost_vsock: false,
            },
            None,
        );

        let kvm_vm = hv.create_vm(
            &loaded.memory,
            VmSetup {
                // The guest keeps the devices it was saved with.
                pit: state.vm.pit.is_some(),
                dirty_log: options.dirty_log,
            },
        )?;
        restore_vm(&kvm_vm.fd, &state.vm)?;

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
        let fds = restore_vcpus(&kvm_vm, &state.vcpus)?;
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
        })
        .inspect(|_| metrics.snapshot().record_load(load_started.elapsed()))
    }

    /// Restores a hibernated VM from `dir` with its saved devices, console output to `console`.
    pub fn wake(dir: &std::path::Path, console: Console) -> Result<Self, VmError> {
        let mut options = RestoreOptions::new(dir);
        options.console = console;
        Self::restore(options)
    }
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

/// Restores each vCPU's state into freshly created vCPU fds.
fn restore_vcpus(
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
