//! One sandbox as the manager holds it: what it is made of (fixed at creation), where it is in
//! its lifecycle, and — while running — its VM, vsock handle and connected agent client.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_client::{AgentClient, AgentClientConfig};

use super::backend::{Backend, Ended};
use super::console_log::ConsoleLog;
use super::disk_copy::CopyMethod;
use super::error::{Result, SandboxError};
use super::process::ProcessContext;
use super::timings::StartTimings;
use super::SandboxId;
use vmm::hypervisor::vcpu::ExitSink;

/// What `get`/`list` report.
#[derive(Debug, Clone)]
pub struct SandboxInfo {
    pub id: SandboxId,
    pub state: SandboxState,
    pub origin: SandboxOrigin,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub vsock_cid: u64,
    pub disks: Vec<SandboxDisk>,
    pub network: Vec<SandboxNic>,
    /// How the last create/fork/wake spent its time.
    pub last_start: StartTimings,
    /// `Isolation::Process`: the pid of the sandbox's running `dormouse` process (the jail's,
    /// when jailed); `None` in-process or while not running.
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxState {
    Running,
    /// Saved to `dir` and freed; `wake` brings it back.
    Hibernated {
        dir: PathBuf,
    },
    /// Its VM has ended and been freed; `reason` says why. The record stays (for `get` and
    /// `list`) until `remove_sandbox`, or until the manager's `stopped_retention` drops it. Other
    /// sandboxes are never affected.
    Stopped {
        reason: StopReason,
    },
}

impl SandboxState {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Hibernated { .. } => "hibernated",
            Self::Stopped { .. } => "stopped",
        }
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self, Self::Stopped { .. })
    }
}

/// Why a sandbox stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// `kill` or `kill_all`.
    Killed,
    /// The guest powered off or rebooted (a sandbox's VM is not restarted).
    GuestPowerOff,
    /// The guest kernel panicked; the console's last lines (at most
    /// [`CONSOLE_TAIL_LINES`]; empty when the console is not kept).
    GuestPanic { console_tail: Vec<String> },
    /// The VMM failed for this sandbox: a panic on one of its VM's threads, a KVM error, a
    /// lifecycle step that lost the VM; with `Isolation::Process`, its process died (`reason`
    /// gives the exit status or signal and the process's telling stderr line, e.g. a seccomp
    /// violation).
    VmmFailed { reason: String },
}

/// Console lines kept in [`StopReason::GuestPanic`].
pub const CONSOLE_TAIL_LINES: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxOrigin {
    Boot { kernel: PathBuf },
    Template { dir: PathBuf },
    Fork { checkpoint: PathBuf },
    Store { url: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxDisk {
    /// The file the VM uses.
    pub path: PathBuf,
    pub read_only: bool,
    /// How the sandbox's private copy was made; `None` for a disk used in place.
    pub copy: Option<CopyMethod>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNic {
    pub tap: String,
    pub mac: [u8; 6],
}

/// Fixed at creation.
#[derive(Debug, Clone)]
pub(crate) struct Description {
    pub origin: SandboxOrigin,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub vsock_cid: u64,
    pub disks: Vec<SandboxDisk>,
    pub network: Vec<SandboxNic>,
}

pub(crate) struct Live {
    pub backend: Backend,
    pub agent: AgentClient,
}

impl Live {
    /// Whether this is the in-process VM that `exit` belongs to.
    pub fn owns_exit(&self, exit: &Arc<ExitSink>) -> bool {
        matches!(&self.backend, Backend::InProcess { vm, .. } if Arc::ptr_eq(&vm.exit_sink(), exit))
    }
}

pub(crate) enum Phase {
    Running(Live),
    Hibernated {
        dir: PathBuf,
    },
    /// Killed, ended on its own, or lost in a failed lifecycle step.
    Gone,
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Running(_) => "running",
            Self::Hibernated { .. } => "hibernated",
            Self::Gone => "stopped",
        }
    }
}

/// What `get` reports without waiting for a lifecycle step.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    pub state: SandboxState,
    pub timings: StartTimings,
    /// When it stopped, for the retention of stopped records.
    pub stopped_at: Option<std::time::Instant>,
}

pub(crate) struct Slot {
    pub id: SandboxId,
    /// Creation order, for `list`.
    pub seq: u64,
    /// The manager's directory for this sandbox's files (disk copies); removed on kill.
    pub work_dir: PathBuf,
    /// Where its console is kept (`None`: discarded).
    pub console_log: Option<ConsoleLog>,
    pub agent_timeout: Duration,
    /// Reply limits and call timeout of the sandbox's agent client (kept for wake).
    pub agent_client: AgentClientConfig,
    /// The seccomp level of the sandbox's VM threads (kept for wake).
    pub seccomp: vmm::SeccompLevel,
    /// `Isolation::Process`: how the manager starts sandbox processes (kept for wake).
    pub process: Option<Arc<ProcessContext>>,
    pub description: Description,
    /// Readable without waiting for a lifecycle step in progress.
    pub summary: Mutex<Summary>,
    /// Lifecycle steps hold it for writing; agent calls briefly for reading.
    pub phase: tokio::sync::RwLock<Phase>,
    /// The directory this library hibernated the sandbox into and then woke it from: its own
    /// snapshot, which the next hibernate into the same directory may replace.
    pub own_hibernation: Mutex<Option<PathBuf>>,
    /// In-process, while hibernated: what the next wake would otherwise make or read.
    pub wake_ahead: Mutex<WakeAhead>,
}

/// Made when an in-process sandbox hibernates, for its next wake.
#[derive(Default)]
pub struct WakeAhead {
    /// The counters for the VM the wake starts (building them was a tenth of a wake's time).
    pub metrics: Option<vmm::metrics::VmMetrics>,
    /// The state just written, as decoding `state.bin` would give it (another tenth). The
    /// restore uses it only while the directory still holds that snapshot (its id).
    pub state: Option<std::sync::Arc<snapshot::DecodedState<vmm::vm::VmSnapshotState>>>,
}

impl Slot {
    pub fn set_summary(&self, state: SandboxState, timings: Option<StartTimings>) {
        let mut s = self.summary.lock().unwrap_or_else(|e| e.into_inner());
        s.stopped_at = match (&state, s.stopped_at) {
            (SandboxState::Stopped { .. }, Some(at)) => Some(at),
            (SandboxState::Stopped { .. }, None) => Some(std::time::Instant::now()),
            _ => None,
        };
        s.state = state;
        if let Some(t) = timings {
            s.timings = t;
        }
    }

    /// Marks it stopped for `reason`, unless it already stopped (the first reason stays: a
    /// guest that powered off and is then killed still says it powered off).
    pub fn mark_stopped(&self, reason: StopReason) {
        let already = self
            .summary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state
            .is_stopped();
        if !already {
            self.set_summary(SandboxState::Stopped { reason }, None);
        }
    }

    pub fn summary(&self) -> Summary {
        self.summary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Why its backend ended, in the public words (with the console's last lines for a
    /// guest panic).
    pub fn stop_reason(&self, ended: Ended) -> StopReason {
        match ended {
            Ended::GuestPowerOff => StopReason::GuestPowerOff,
            Ended::GuestPanic => StopReason::GuestPanic {
                console_tail: self
                    .console_log
                    .as_ref()
                    .map(|log| log.tail_lines(CONSOLE_TAIL_LINES))
                    .unwrap_or_default(),
            },
            Ended::Failed(reason) => StopReason::VmmFailed { reason },
        }
    }

    pub fn info(&self) -> SandboxInfo {
        let Summary {
            mut state,
            timings: last_start,
            ..
        } = self.summary();
        // A guest that powered off (or a process that died and is not yet marked) is only
        // noticed here: check without waiting for a lock.
        let mut pid = None;
        if let Ok(phase) = self.phase.try_read() {
            if let Phase::Running(live) = &*phase {
                pid = live.backend.pid();
                if state == SandboxState::Running {
                    if let Some(ended) = live.backend.ended() {
                        state = SandboxState::Stopped {
                            reason: self.stop_reason(ended),
                        };
                    }
                }
            }
        }
        let d = &self.description;
        SandboxInfo {
            id: self.id.clone(),
            state,
            origin: d.origin.clone(),
            vcpus: d.vcpus,
            mem_mib: d.mem_mib,
            vsock_cid: d.vsock_cid,
            disks: d.disks.clone(),
            network: d.network.clone(),
            last_start,
            pid,
        }
    }

    pub fn wrong_state(
        &self,
        phase: &Phase,
        operation: &'static str,
        needs: &'static str,
    ) -> SandboxError {
        SandboxError::WrongState {
            id: self.id.clone(),
            state: phase.name(),
            operation,
            needs,
        }
    }

    /// The connected agent of a running sandbox (a cheap clone; calls run concurrently).
    pub async fn agent(&self, operation: &'static str) -> Result<AgentClient> {
        let phase = self.phase.read().await;
        match &*phase {
            Phase::Running(live) => Ok(live.agent.clone()),
            other => Err(self.wrong_state(other, operation, "running")),
        }
    }
}
