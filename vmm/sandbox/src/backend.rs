//! The running part of a sandbox: its VM inside this process, or its own `dormouse` process.

use std::sync::Arc;

use devices::virtio::vsock::VsockHandle;

use super::process::SandboxProcess;
use vmm::vm::Vm;

pub(crate) enum Backend {
    /// `Isolation::InProcess`: the VM's threads run in the worker; the agent is reached over
    /// the in-process vsock handle.
    InProcess { vm: Vm, vsock: VsockHandle },
    /// `Isolation::Process`: a supervised `dormouse` process.
    Process(Arc<SandboxProcess>),
}

/// How a backend that ended on its own ended.
pub(crate) enum Ended {
    /// The guest powered off (or the process exited 0).
    Stopped,
    /// The VMM (or the sandbox process) failed.
    Failed(String),
}

impl Backend {
    /// Whether the VM has ended on its own (not by the manager's hand).
    pub fn ended(&self) -> Option<Ended> {
        match self {
            Self::InProcess { vm, .. } => vm.controller().exit_reason().map(|_| Ended::Stopped),
            Self::Process(p) if p.exit_expected() => None,
            Self::Process(p) => p.exit_info().map(|info| {
                if info.status.success() {
                    Ended::Stopped
                } else {
                    Ended::Failed(info.reason)
                }
            }),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::InProcess { .. } => None,
            Self::Process(p) => Some(p.pid()),
        }
    }
}
