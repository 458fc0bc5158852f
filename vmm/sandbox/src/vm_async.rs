//! Async versions of the VM control operations, for tokio programs that embed dormouse.
//!
//! Pausing parks every vCPU thread and the device loop, and a snapshot writes files: both block
//! for milliseconds or more, so each call runs on tokio's blocking pool (`spawn_blocking`) and
//! never stalls the caller's executor threads.

use std::path::PathBuf;

use vmm::vm::{ControlError, VmController};
use vmm::vm::{SnapshotOutcome, SnapshotVmError};
use vmm_api::{VmControl, VmInfo};

#[derive(Debug, thiserror::Error)]
pub enum AsyncVmError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotVmError),
    #[error("VM {operation}: {message}")]
    Other {
        operation: &'static str,
        message: String,
    },
    /// The blocking task panicked or the runtime is shutting down.
    #[error("VM {0}: the blocking task did not complete")]
    TaskLost(&'static str),
}

/// Runs `f` on the blocking pool and flattens its result.
async fn blocking<T, E>(
    operation: &'static str,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, AsyncVmError>
where
    T: Send + 'static,
    E: Into<AsyncVmError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| AsyncVmError::TaskLost(operation))?
        .map_err(Into::into)
}

/// The async VM operations, on [`VmController`] (`use vmm_sandbox::VmAsync;`).
#[allow(async_fn_in_trait)] // callers await these on their own runtime; no Send bound is needed
pub trait VmAsync {
    /// Pauses all vCPUs and parks the device loop (no request in flight afterwards).
    async fn pause_async(&self) -> Result<(), AsyncVmError>;
    async fn resume_async(&self) -> Result<(), AsyncVmError>;
    /// Writes a snapshot to `dir` (absolute). A running VM is paused for the duration and then
    /// resumed; a paused one stays paused. `diff` writes only pages dirtied since the previous
    /// snapshot of this VM. A snapshot already in `dir` is replaced only with `replace`;
    /// anything else there is refused.
    async fn snapshot_async(
        &self,
        dir: impl Into<PathBuf>,
        diff: bool,
        replace: bool,
    ) -> Result<SnapshotOutcome, AsyncVmError>;
    /// Asks the VM to stop; its owner's `Vm::wait` returns. Does not block: it only signals.
    async fn shutdown_async(&self) -> Result<(), AsyncVmError>;
    /// State, size, command line and devices of the VM (what `GET /v1/vm` returns).
    async fn info_async(&self) -> Result<VmInfo, AsyncVmError>;
}

impl VmAsync for VmController {
    async fn pause_async(&self) -> Result<(), AsyncVmError> {
        let this = self.clone();
        blocking("pause", move || this.pause()).await
    }

    async fn resume_async(&self) -> Result<(), AsyncVmError> {
        let this = self.clone();
        blocking("resume", move || this.resume()).await
    }

    async fn snapshot_async(
        &self,
        dir: impl Into<PathBuf>,
        diff: bool,
        replace: bool,
    ) -> Result<SnapshotOutcome, AsyncVmError> {
        let this = self.clone();
        let dir = dir.into();
        let target = snapshot::TargetPolicy {
            replace,
            companions: None,
        };
        blocking("snapshot", move || this.snapshot(&dir, diff, target)).await
    }

    async fn shutdown_async(&self) -> Result<(), AsyncVmError> {
        self.shutdown();
        Ok(())
    }

    async fn info_async(&self) -> Result<VmInfo, AsyncVmError> {
        let this = self.clone();
        blocking("info", move || {
            VmControl::info(&this).map_err(|e| AsyncVmError::Other {
                operation: "info",
                message: e.to_string(),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    //! Against the tiny test guest (a few bytes of code that idle in `hlt`): fast, no Linux.
    use super::*;
    use vmm::tiny_guest::{self, TinyGuestEnd};
    use vmm::vm::{Console, RunState, Vm, VmConfig};
    use vmm_api::VmState;

    fn kvm_usable() -> bool {
        let ok = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if !ok {
            assert!(
                std::env::var_os("CI").is_none(),
                "/dev/kvm is not usable and CI is set"
            );
            eprintln!("SKIPPED: /dev/kvm is not available");
        }
        ok
    }

    fn idle_vm(dir: &std::path::Path) -> Vm {
        let kernel = dir.join("tiny-idle.elf");
        tiny_guest::write_to(&kernel, TinyGuestEnd::Idle).unwrap();
        let mut config = VmConfig::new(&kernel);
        config.console = Console::Null;
        config.mem_mib = 16;
        Vm::start(config).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_pause_resume_snapshot_info_shutdown() {
        if !kvm_usable() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let vm = idle_vm(dir.path());
        let ctl = vm.controller();

        assert_eq!(ctl.info_async().await.unwrap().state, VmState::Running);
        ctl.pause_async().await.unwrap();
        assert_eq!(ctl.run_state(), RunState::Paused);
        assert_eq!(ctl.info_async().await.unwrap().state, VmState::Paused);
        // A second pause is refused with the state error, not swallowed.
        assert!(matches!(
            ctl.pause_async().await,
            Err(AsyncVmError::Control(ControlError::AlreadyPaused))
        ));
        ctl.resume_async().await.unwrap();
        assert_eq!(ctl.run_state(), RunState::Running);
        assert!(matches!(
            ctl.resume_async().await,
            Err(AsyncVmError::Control(ControlError::NotPaused))
        ));

        let full = dir.path().join("full");
        let outcome = ctl.snapshot_async(&full, false, false).await.unwrap();
        assert!(!outcome.diff);
        assert!(full.join("state.bin").is_file());
        assert!(full.join("memory.bin").is_file());
        // The snapshot resumed the VM it paused.
        assert_eq!(ctl.run_state(), RunState::Running);
        // Again into the same directory: only when asked to replace it.
        let refused = ctl.snapshot_async(&full, false, false).await.unwrap_err();
        assert!(
            matches!(
                &refused,
                AsyncVmError::Snapshot(SnapshotVmError::Snapshot(
                    snapshot::SnapshotError::TargetRefused { .. }
                ))
            ),
            "{refused}"
        );
        assert_eq!(ctl.run_state(), RunState::Running);
        let again = ctl.snapshot_async(&full, false, true).await.unwrap();
        assert_ne!(again.snapshot_id, outcome.snapshot_id);
        // A directory with a file of someone else's is never written to.
        let busy = dir.path().join("busy");
        std::fs::create_dir(&busy).unwrap();
        std::fs::write(busy.join("notes.txt"), b"keep me").unwrap();
        assert!(ctl.snapshot_async(&busy, false, true).await.is_err());
        assert_eq!(std::fs::read(busy.join("notes.txt")).unwrap(), b"keep me");
        assert!(!busy.join("memory.bin").exists());

        let diff = dir.path().join("diff");
        let outcome = ctl.snapshot_async(&diff, true, false).await.unwrap();
        assert!(outcome.diff);
        assert!(outcome.parent_id.is_some());
        assert!(matches!(
            ctl.snapshot_async("relative/dir", false, false).await,
            Err(AsyncVmError::Snapshot(SnapshotVmError::RelativeDir(_)))
        ));

        let info = ctl.info_async().await.unwrap();
        assert_eq!(info.mem_mib, 16);
        assert_eq!(info.vcpus, 1);

        ctl.shutdown_async().await.unwrap();
        assert_eq!(ctl.info_async().await.unwrap().state, VmState::ShuttingDown);
        assert!(matches!(
            ctl.pause_async().await,
            Err(AsyncVmError::Control(ControlError::Stopped))
        ));
        let exit = tokio::task::spawn_blocking(move || vm.wait())
            .await
            .unwrap();
        assert_eq!(exit, vmm::VmExit::HostShutdown);
    }
}
