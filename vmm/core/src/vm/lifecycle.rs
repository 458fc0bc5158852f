//! A running VM as its owner holds it ([`Vm`]): checkpoint, hibernate, wait for its end, and
//! [`StoppedVm`] for a process that exits without waiting for KVM's teardown.

use std::sync::Arc;

use devices::GuestMemory;

use super::control::VmController;
use super::core::VmCore;
use crate::exit::{ExitSink, VmExit};
use crate::host::HostKind;

/// A running VM. Dropping it stops the VM.
pub struct Vm {
    pub(super) core: Arc<VmCore>,
}

impl Vm {
    /// Where this VM reports its end (for owners that want a callback: `ExitSink::on_exit`).
    pub fn exit_sink(&self) -> Arc<ExitSink> {
        self.core.exit.clone()
    }

    pub fn controller(&self) -> VmController {
        VmController {
            core: self.core.clone(),
        }
    }

    pub fn host(&self) -> HostKind {
        self.core.host
    }

    pub fn cmdline(&self) -> &str {
        &self.core.cmdline
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.core.memory
    }

    /// Writes a snapshot of the running VM to `dir` (absolute); the VM keeps running. A snapshot
    /// already in `dir` is replaced only with `replace`.
    pub fn checkpoint(
        &self,
        dir: &std::path::Path,
        replace: bool,
    ) -> Result<super::snapshot::SnapshotOutcome, super::error::SnapshotVmError> {
        self.core.snapshot(
            dir,
            false,
            snapshot::TargetPolicy {
                replace,
                companions: None,
            },
        )
    }

    /// Hibernates the VM to `dir`: pauses it, flushes its disk files to stable storage, writes a
    /// full snapshot, then stops the VM and frees its memory. `Vm::wake(dir)` brings it back.
    /// A snapshot already in `dir` is replaced only with `replace`.
    pub fn hibernate(
        self,
        dir: &std::path::Path,
        replace: bool,
    ) -> Result<super::snapshot::SnapshotOutcome, super::error::SnapshotVmError> {
        self.core.pause()?;
        for path in self.core.devices.writable_disks() {
            // The device writes through the page cache; fsync on any fd of the file flushes it.
            if let Err(e) = std::fs::File::open(&path).and_then(|f| f.sync_all()) {
                tracing::warn!("hibernate: flushing {} failed: {e}", path.display());
            }
        }
        let outcome = self.core.snapshot(
            dir,
            false,
            snapshot::TargetPolicy {
                replace,
                companions: None,
            },
        )?;
        drop(self);
        Ok(outcome)
    }

    /// Blocks until the VM ends, then tears it down and says why it ended.
    pub fn wait(self) -> VmExit {
        self.wait_stopped().0
    }

    /// Like `wait`, but hands back the stopped VM (vCPU and device threads ended, KVM VM and
    /// memory still held) instead of releasing it here: a process about to exit can then leave
    /// KVM's slow teardown out of its exit path (`StoppedVm::exit_process`).
    pub fn wait_stopped(self) -> (VmExit, StoppedVm) {
        let reason = self.core.exit.wait();
        #[cfg(any(test, feature = "fault-injection"))]
        crate::fault::main_fault_point();
        self.core.teardown();
        let panicked = self.core.devices.console_panicked();
        let reason = if reason == VmExit::GuestReboot && panicked {
            VmExit::GuestPanic
        } else {
            reason
        };
        let stopped = StoppedVm {
            core: self.core.clone(),
        };
        (reason, stopped)
    }
}

/// A VM whose vCPUs and devices have stopped; dropping it releases the KVM VM and the guest
/// memory (once no controller holds them either).
pub struct StoppedVm {
    core: Arc<VmCore>,
}

impl StoppedVm {
    /// Ends the process with `code` without waiting for KVM to destroy the VM: a helper process
    /// holds the VM fd and the guest memory until this process is gone, then releases them
    /// (see `hypervisor::teardown`). For CLIs; a library user that goes on running drops the
    /// `StoppedVm` instead.
    pub fn exit_process(self, code: i32) -> ! {
        use std::os::fd::AsRawFd;
        crate::hypervisor::teardown::exit_leaving_teardown(
            &[self.core.kvm_vm.fd.as_raw_fd()],
            code,
            self.core.seccomp,
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.core.teardown();
    }
}
