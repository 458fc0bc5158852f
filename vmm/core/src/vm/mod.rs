//! VM lifecycle: [`VmConfig`] → a running [`Vm`] → `wait()` for how it ended; snapshots and
//! restore. One module per step, no cycles between them:
//!
//! ```text
//! config ─┐                      (VmConfig, RestoreOptions, Console)
//! error ──┤                      (VmError, ControlError, SnapshotVmError)
//! state ──┤                      (VmSnapshotState: what state.bin holds, its checks, format 2)
//! core ───┼─ snapshot ─ control ─ lifecycle ─ build ─ shell ─ restore
//!         │  (VmCore)   (VmController) (Vm)   (start, launch) (VmShell) (restore, wake,
//!         │                                                              restore_into)
//! ```

mod build;
mod config;
mod control;
mod core;
mod error;
mod lifecycle;
mod live_snapshot;
mod restore;
mod shell;
mod snapshot;
mod state;

pub use crate::device_manager::{NetOverride, VsockOverride};
pub use config::{
    compose_cmdline, Console, LazyRestore, RestoreOptions, VmConfig, DEFAULT_CMDLINE, MAX_VCPUS,
};
pub use control::{VirtioStatus, VmController, VmStatus};
pub use core::MemoryOrigin;
pub use error::{ControlError, RunState, SnapshotVmError, VmError};
pub use lifecycle::{StoppedVm, Vm};
pub use restore::{RestoreIntoError, RESTORED_MARKER};
pub use shell::{ShellShape, VmShell};
pub use snapshot::{host_info, SnapshotOptions, SnapshotOutcome};
pub use state::VmSnapshotState;
