//! What can go wrong building, controlling and snapshotting a VM.

use std::path::PathBuf;

use crate::boot;
use crate::device_manager::DeviceError;
use crate::event_loop::EventLoopError;
use crate::hypervisor::state::StateError;
use crate::hypervisor::HypervisorError;
use crate::memory::MemoryError;

use super::config::MAX_VCPUS;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    VcpuCount(u8),
    #[error("kernel {0}: {1}")]
    KernelFile(PathBuf, std::io::Error),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error("cannot start a vCPU thread: {0}")]
    VcpuThread(std::io::Error),
    #[error("snapshot: {0}")]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("restoring KVM state: {0}")]
    State(#[from] StateError),
    #[error("restoring: {0}")]
    Restore(#[from] SnapshotVmError),
    #[error("vsock: {0}")]
    Vsock(devices::virtio::vsock::VsockError),
    #[error("the snapshot is inconsistent: {0}")]
    BadSnapshot(String),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("reading KVM's capabilities: {0}")]
    HostCaps(StateError),
    #[error(
        "the snapshot does not fit this VM shell: the shell is {shell}, the restore needs {wanted}"
    )]
    ShellMismatch { shell: String, wanted: String },
    #[error("a VM shell cannot take {0}; restore without one")]
    ShellRefused(String),
    #[error("a VM shell's RAM: {0}")]
    ShellRam(#[from] crate::reserved_ram::ReservedRamError),
}

/// Whether the vCPUs and devices are running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM has stopped")]
    Stopped,
    #[error("vCPU {0} did not answer (its thread has ended)")]
    VcpuGone(u8),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error("the VM has no {kind} {index}")]
    NoSuchDevice { kind: &'static str, index: usize },
    #[error("{0}")]
    RateLimiter(#[from] devices::rate_limiter::RateLimiterError),
    #[error("{0}")]
    Keyboard(#[from] devices::legacy::i8042::I8042Error),
    #[error("{0}")]
    Disk(#[from] devices::virtio::block::BlockError),
    #[error("the VM has no balloon device")]
    NoBalloon,
    #[error("{0}")]
    Balloon(String),
    /// A request this VM cannot serve (test builds: a fault it cannot inject).
    #[error("{0}")]
    Unsupported(&'static str),
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
