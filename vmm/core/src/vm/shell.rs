//! Pre-built VMs that are not running yet (`VmShell`): everything of a restore that does not
//! depend on the snapshot, done ahead of time, so a restore into one (`Vm::restore_into`) only
//! maps the snapshot's memory over the shell's RAM and loads the saved state.

use std::sync::Arc;

use kvm_ioctls::VcpuFd;

use crate::exit::ExitSink;
use crate::host::{self, CpuVendor, GuestKernelKind, HostKind};
use crate::hypervisor::state::StateError;
use crate::hypervisor::{vcpu, Hypervisor, VmSetup};
use crate::reserved_ram::ReservedRam;
use crate::seccomp::SeccompLevel;
use snapshot::HostInfo;

use super::build::prespawn_vcpus;
use super::config::RestoreOptions;
use super::config::MAX_VCPUS;
use super::error::{SnapshotVmError, VmError};
use super::snapshot::{host_info, host_kind_name};
use super::state::VmSnapshotState;

/// What a shell is built for. A snapshot restores into a shell only when its VM had the same
/// vCPU count, memory size and PIT, and the restore asks for the same dirty logging and seccomp
/// level (the vCPU threads already run under their filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShellShape {
    pub vcpus: u8,
    pub mem_mib: u64,
    /// Whether the VM has the in-kernel PIT (a snapshot records whether its VM had one).
    pub pit: bool,
    pub dirty_log: bool,
    pub seccomp: SeccompLevel,
}

impl ShellShape {
    /// The shape a restore of `options.dir` with `options` needs (the snapshot's state:
    /// `options.known_state`, or read).
    pub fn for_snapshot(options: &RestoreOptions) -> Result<Self, VmError> {
        // A known state is not checked against the directory here: a wrong shape only makes
        // the restore refuse the shell (`VmError::ShellMismatch`) and run without one.
        if let Some(known) = &options.known_state {
            return Ok(Self::of(known.state(), options));
        }
        let state: VmSnapshotState = snapshot::read_state(&options.dir)?;
        Ok(Self::of(&state, options))
    }

    /// The shape a restore of a VM saved as `state`, with `options`, needs.
    pub(super) fn of(state: &VmSnapshotState, options: &RestoreOptions) -> Self {
        Self {
            vcpus: state.vcpu_count,
            mem_mib: state.mem_mib,
            pit: state.vm.pit.is_some(),
            dirty_log: options.dirty_log,
            seccomp: options.seccomp,
        }
    }
}

/// A KVM VM with host addresses for its guest RAM reserved and registered as memory slots
/// (left unmapped until a restore maps a snapshot there: [`ReservedRam`]), the irqchip (and PIT) created,
/// the vCPUs created, and their threads started and parked under their seccomp filter. Dropped
/// unused, all of it goes: the parked threads end, the fds close, the RAM is unmapped.
pub struct VmShell {
    pub(super) shape: ShellShape,
    /// Read when the shell was built: /proc/cpuinfo costs a fifth of a millisecond here.
    pub(super) host: HostFacts,
    pub(super) ram: ReservedRam,
    pub(super) kvm_vm: crate::hypervisor::Vm,
    pub(super) fds: Vec<VcpuFd>,
    /// The sink the parked vCPU threads report to; the restored VM's.
    pub(super) exit: Arc<ExitSink>,
    pub(super) early_vcpus: Vec<vcpu::PendingVcpu>,
}

impl std::fmt::Debug for VmShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShell")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl VmShell {
    /// Builds a shell for `shape`.
    pub fn build(shape: ShellShape) -> Result<Self, VmError> {
        if shape.vcpus == 0 || shape.vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(shape.vcpus));
        }
        let hv = Hypervisor::open()?;
        let exit = Arc::new(ExitSink::default());
        let early_vcpus = prespawn_restore_vcpus(shape.vcpus, &exit, shape.seccomp);
        let ram = ReservedRam::reserve(shape.mem_mib)?;
        let kvm_vm = hv.create_vm(
            &ram.memory()?,
            VmSetup {
                pit: shape.pit,
                dirty_log: shape.dirty_log,
            },
        )?;
        let fds = create_vcpus(&kvm_vm, shape.vcpus)?;
        let host = HostFacts::detect(hv.vendor);
        Ok(Self {
            shape,
            host,
            ram,
            kvm_vm,
            fds,
            exit,
            early_vcpus,
        })
    }

    pub fn shape(&self) -> ShellShape {
        self.shape
    }
}

/// What a restore checks a snapshot's host facts against, for either kind of guest kernel
/// (the snapshot says which it has).
pub(super) struct HostFacts {
    unmodified: (HostKind, HostInfo),
    pvm_aware: (HostKind, HostInfo),
}

impl HostFacts {
    pub(super) fn detect(vendor: CpuVendor) -> Self {
        let sys = std::path::Path::new("/sys");
        let unmodified = host::detect(sys, vendor, GuestKernelKind::Unmodified);
        let pvm_aware = host::detect(sys, vendor, GuestKernelKind::PvmAware);
        let info = host_info(unmodified);
        let aware_info = HostInfo {
            kind: host_kind_name(pvm_aware),
            ..info.clone()
        };
        Self {
            unmodified: (unmodified, info),
            pvm_aware: (pvm_aware, aware_info),
        }
    }

    pub(super) fn for_guest(&self, guest: GuestKernelKind) -> (HostKind, HostInfo) {
        match guest {
            GuestKernelKind::Unmodified => self.unmodified.clone(),
            GuestKernelKind::PvmAware => self.pvm_aware.clone(),
        }
    }
}

/// Starts the vCPU threads of a VM to be restored, each installing its filter while the VM is
/// rebuilt. The snapshot's vsock datapath is not known yet: userspace (what a hybrid socket
/// needs) is the guess, and a vhost-kernel restore starts its threads at launch instead.
pub(super) fn prespawn_restore_vcpus(
    count: u8,
    exit: &Arc<ExitSink>,
    seccomp: SeccompLevel,
) -> Vec<vcpu::PendingVcpu> {
    prespawn_vcpus(
        count,
        exit,
        vcpu::VcpuFilter {
            level: seccomp,
            vhost_vsock: false,
        },
        None,
    )
}

/// Creates `count` bare vCPUs (no boot configuration: a restore sets their whole state).
pub(super) fn create_vcpus(
    vm: &crate::hypervisor::Vm,
    count: u8,
) -> Result<Vec<VcpuFd>, SnapshotVmError> {
    (0..count)
        .map(|index| {
            vm.fd
                .create_vcpu(u64::from(index))
                .map_err(|source| StateError::VcpuIoctl {
                    vcpu: index,
                    ioctl: "KVM_CREATE_VCPU",
                    source,
                })
                .map_err(SnapshotVmError::from)
        })
        .collect()
}
