//! The sandbox library a worker embeds: many sandboxes in one process, each a microVM with the
//! guest agent, reached over the VM's in-process vsock.
//!
//! [`SandboxManager`] creates sandboxes (booted, or restored from a template snapshot), runs
//! commands and file operations through each sandbox's agent, and hibernates, wakes,
//! checkpoints and forks them. See docs/sandbox.md.
//!
//! Modules: `config` (what a sandbox is made of), `identity` (ids, CIDs, TAPs, MACs),
//! `start` (building the VM), `agent_link` (reaching the agent, readiness), `lifecycle`
//! (hibernate, wake, checkpoint), `console_log` (the bounded console file), `disk_copy` (reflink or sparse copy), `checkpoint_files`
//! (the disk copies in a checkpoint), `instance` (one sandbox's record), `backend` (its running
//! part: in-process VM or own process), `isolation` (the manager's choice), `process/` (sandbox
//! processes: spawn, supervise, API steps), `tasks` (blocking/detached helpers), `manager/`
//! (the registry; `manager/agent_ops`: exec and files; `manager/process_start`), `warm_pool`
//! (pre-built VM shells that in-process wakes and template starts restore into).

// Guest memory, snapshot files and API requests are hostile input: outside tests, nothing may
// unwrap or expect (a panic would end the VM). Tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod agent_link;
mod backend;
mod checkpoint_files;
mod config;
mod console_log;
mod disk_copy;
mod error;
mod identity;
mod instance;
mod isolation;
mod lifecycle;
mod log_text;
mod manager;
mod next_start;
mod process;
mod start;
mod store_wake;
mod tasks;
mod template_cache;
mod template_store;
mod timings;
mod vm_async;
mod warm_pool;

pub use checkpoint_files::SANDBOX_FILE;
pub use config::{
    BootSpec, DiskSpec, ForkConfig, GuestIp, NetworkConfig, SandboxConfig, SandboxSource,
    SnapshotOptions, DEFAULT_AGENT_TIMEOUT,
};
pub use console_log::{CONSOLE_LOG_FILE, DEFAULT_CONSOLE_LOG_BYTES};
pub use disk_copy::{clone_or_copy, CopyMethod};
pub use error::{Result, SandboxError};
pub use identity::SandboxId;
pub use instance::{
    SandboxDisk, SandboxInfo, SandboxNic, SandboxOrigin, SandboxState, StopReason,
    CONSOLE_TAIL_LINES,
};
pub use isolation::{
    CgroupVersion, CpuQuota, Isolation, JailSettings, ProcessIsolation, DEFAULT_MEMORY_OVERHEAD_MIB,
};
pub use manager::{HibernatedToStore, ManagerConfig, SandboxManager, StoppedRetention};
pub use template_store::fetch_template;
pub use timings::StartTimings;
pub use vm_async::{AsyncVmError, VmAsync};
pub use vmm::vm::ShellShape;
pub use warm_pool::{WarmPoolStats, WarmShape};

// The VM core's vocabulary, so a worker depends on this crate alone: what `hibernate` and
// `checkpoint` return and fail with, too.
pub use devices::virtio::balloon::{BalloonConfig, BalloonStatus};
pub use snapshot::{MemoryStorage, SnapshotError};
pub use vmm::vm::{SnapshotOutcome, SnapshotVmError};
pub use vmm::{Console, RestoreOptions, SeccompLevel, Vm, VmConfig, VmController, VmError, VmExit};

// The agent client's vocabulary, so a worker needs no direct dependency on the agent crate.
pub use agent_client::{
    AgentClient, AgentClientConfig, AttachEvent, AttachInput, ClientError, ExecAttachment,
    ExecCommand, ExecEvent, ExecInput, ExecOutput, ExecSession, ExecSessionId, ExecSessionInfo,
    ExecSessionState, ExecStarted, ExitOutcome, FileInfo, FileKind, InvalidSessionId, OutputStream,
    ReplyLimits, WriteOptions, DEFAULT_CALL_TIMEOUT, MAX_SESSIONS, SESSION_OUTPUT_BYTES,
    SESSION_RETENTION,
};
/// The gRPC status code of an agent error (`SandboxError::agent_code`).
pub use tonic::Code as AgentCode;
