//! The running part of a sandbox: its VM inside this process, or its own `dormouse` process.

use std::sync::Arc;

use devices::virtio::vsock::VsockHandle;

use super::process::{ExitInfo, SandboxProcess, GUEST_PANIC_LINE};
use vmm::vm::Vm;
use vmm::VmExit;

pub(crate) enum Backend {
    /// `Isolation::InProcess`: the VM's threads run in the worker; the agent is reached over
    /// the in-process vsock handle.
    InProcess { vm: Vm, vsock: VsockHandle },
    /// `Isolation::Process`: a supervised `dormouse` process.
    Process(Arc<SandboxProcess>),
}

/// How a backend that ended on its own ended.
pub(crate) enum Ended {
    /// The guest powered off or rebooted (or the process exited 0).
    GuestPowerOff,
    /// The guest kernel panicked.
    GuestPanic,
    /// The VMM (or the sandbox process) failed.
    Failed(String),
}

impl Ended {
    /// `None` for an end the host asked for.
    pub fn of_exit(exit: &VmExit) -> Option<Self> {
        match exit {
            VmExit::GuestPowerOff | VmExit::GuestReboot => Some(Self::GuestPowerOff),
            VmExit::GuestPanic => Some(Self::GuestPanic),
            VmExit::Failed(reason) => Some(Self::Failed(reason.clone())),
            VmExit::HostShutdown => None,
        }
    }

    /// How a sandbox process's exit reads: 0 is a power-off, the CLI's panic verdict a panic.
    pub fn of_process(info: &ExitInfo) -> Self {
        if info.status.success() {
            Self::GuestPowerOff
        } else if info.reason.ends_with(GUEST_PANIC_LINE) {
            Self::GuestPanic
        } else {
            Self::Failed(info.reason.clone())
        }
    }
}

impl Backend {
    /// Whether the VM has ended on its own (not by the manager's hand).
    pub fn ended(&self) -> Option<Ended> {
        match self {
            Self::InProcess { vm, .. } => vm
                .controller()
                .exit_reason()
                .and_then(|exit| Ended::of_exit(&exit)),
            Self::Process(p) if p.exit_expected() => None,
            Self::Process(p) => p.exit_info().map(|info| Ended::of_process(&info)),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::InProcess { .. } => None,
            Self::Process(p) => Some(p.pid()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    fn exited(code: i32, reason: &str) -> ExitInfo {
        ExitInfo {
            status: ExitStatus::from_raw(code << 8),
            reason: reason.to_owned(),
        }
    }

    #[test]
    fn how_an_end_reads() {
        assert!(matches!(
            Ended::of_process(&exited(0, "dormouse process exited with status 0")),
            Ended::GuestPowerOff
        ));
        let panicked = format!("dormouse process exited with status 1: {GUEST_PANIC_LINE}");
        assert!(matches!(
            Ended::of_process(&exited(1, &panicked)),
            Ended::GuestPanic
        ));
        let seccomp = "dormouse process exited with status 159: dormouse: seccomp violation";
        assert!(matches!(
            Ended::of_process(&exited(159, seccomp)),
            Ended::Failed(reason) if reason == seccomp
        ));
        assert!(Ended::of_exit(&VmExit::HostShutdown).is_none());
        assert!(matches!(
            Ended::of_exit(&VmExit::GuestReboot),
            Some(Ended::GuestPowerOff)
        ));
        assert!(matches!(
            Ended::of_exit(&VmExit::GuestPanic),
            Some(Ended::GuestPanic)
        ));
    }
}
