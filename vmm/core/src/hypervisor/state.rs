//! KVM state for snapshots: what a paused VM and its vCPUs hold inside KVM, as serde types, and
//! the functions that read it out and put it back.
//!
//! Restoring is construction: the caller makes a fresh VM (irqchip, PIT, memory) and bare vCPUs
//! (`create_vcpu`, no boot configuration), then calls [`restore_vm`] and [`restore_vcpu`]. The
//! state is checked before the first ioctl where it can be; on any error the VM and its vCPUs are
//! in an unspecified state and must be dropped, never run.
//!
//! Saving needs the vCPUs parked outside `KVM_RUN`, with any I/O exit completed first
//! ([`complete_pending_io`]), or the instruction that exited would run twice after a restore.

mod caps;
mod msrs;
mod vcpu;
mod vm;

#[cfg(test)]
mod tests;

/// Learns this host's KVM capabilities now (a /dev/kvm open and a few ioctls, once per
/// process) instead of at the first snapshot: a vCPU thread reading its state must not need to
/// open files under its seccomp filter.
pub fn probe_host_caps() -> Result<(), StateError> {
    caps::host_caps().map(|_| ())
}

/// [`probe_host_caps`] through an already open /dev/kvm (the CPUID prefetch's).
pub fn probe_host_caps_with(kvm: &kvm_ioctls::Kvm) {
    caps::probe_with(kvm)
}

pub use msrs::{supported_msr_indices, MsrEntry, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
pub use vcpu::{complete_pending_io, restore_vcpu, save_vcpu, FpuState, VcpuState};
pub use vm::{restore_vm, restore_vm_with_clock, save_vm, GuestClock, VmState};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open /dev/kvm to learn what KVM can save: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("vCPU {vcpu}: {ioctl} failed: {source}")]
    VcpuIoctl {
        vcpu: u8,
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("VM: {ioctl} failed: {source}")]
    VmIoctl {
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("probing which MSRs KVM saves: {ioctl} failed: {source}")]
    ProbeIoctl {
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: KVM rejected MSR {index:#x} = {value:#x} on restore")]
    MsrRejected { vcpu: u8, index: u32, value: u64 },
    #[error("vCPU {vcpu}: invalid saved state: {reason}")]
    InvalidVcpuState { vcpu: u8, reason: String },
    #[error("invalid saved VM state: {0}")]
    InvalidVmState(String),
    #[error("vCPU {vcpu}: the snapshot holds {what}, which this host's KVM cannot restore")]
    Unsupported { vcpu: u8, what: &'static str },
    #[error(
        "vCPU {vcpu}: the snapshot's TSC runs at {saved_khz} kHz and this host's at {host_khz} kHz; \
         KVM here cannot scale it (no KVM_CAP_TSC_CONTROL), so guest time would run wrong"
    )]
    TscFrequency {
        vcpu: u8,
        saved_khz: u32,
        host_khz: u32,
    },
    #[error("vCPU {vcpu}: completing the last I/O exit before saving needs another exit ({exit})")]
    IoNotSettled { vcpu: u8, exit: String },
}

/// Maps a vCPU ioctl error to [`StateError::VcpuIoctl`].
fn vcpu_ioctl(vcpu: u8, ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::VcpuIoctl {
        vcpu,
        ioctl,
        source,
    }
}

/// Maps a VM ioctl error to [`StateError::VmIoctl`].
fn vm_ioctl(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::VmIoctl { ioctl, source }
}
