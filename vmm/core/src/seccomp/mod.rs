//! seccomp filters, one allowlist per kind of thread dormouse starts.
//!
//! A guest that escapes into the VMM (a bug in a device model, in KVM's exit handling, in the
//! snapshot code) finds itself in a thread that can make only the system calls that thread
//! needs: a vCPU thread can `KVM_RUN` but not open files or sockets, the device thread cannot
//! create VMs, nothing can `execve`. Each thread installs its filter ([`install`]) at the start
//! of its body, before it touches guest memory or a device; the CLI's main thread installs its
//! own once the VM is built, before it waits.
//!
//! The filters are built here in Rust with `seccompiler` (one file per thread kind: `vcpu`,
//! `devices`, `api`, `main_thread`, `agent_ready`, `signals`, `teardown`, `store_fetch`,
//! `snapshot_writer`, `metrics_flush`; shared pieces in `rules`, ioctl numbers in `ioctls`);
//! `layout` lays each out as one short BPF program (the kernel's cost to install a filter grows
//! with its length), seccompiler building
//! the parts that check several arguments. [`SeccompLevel`] decides what a call outside
//! the list does:
//!
//! - `Enforce` (the default): the kernel traps the call (`SECCOMP_RET_TRAP`, with the thread
//!   kind's number in the return data); a `SIGSYS` handler installed once per process writes
//!   `dormouse: seccomp violation: thread <kind> called syscall <nr> (<name>) …` to stderr and
//!   ends the process with status [`VIOLATION_EXIT_STATUS`] (159, as 128 + SIGSYS), so whoever
//!   supervises the VMM sees which thread made which call.
//! - `Log`: the kernel logs the call (`SECCOMP_RET_LOG`: the audit log, `dmesg`) and lets it
//!   proceed. For finding what a new code path needs.
//! - `Off`: no filter.
//!
//! Filters stack: a thread started by a filtered thread inherits its filter. That is why the
//! API server's accept thread and its connection threads share one kind (`api`), and the agent
//! readiness listener and its connection threads another (`agent-ready`).

mod agent_ready;
mod api;
mod devices;
mod handler;
pub mod ioctls;
mod layout;
mod main_thread;
mod metrics_flush;
pub mod names;
pub mod rules;
mod signals;
mod snapshot_writer;
mod store_fetch;
mod teardown;
mod vcpu;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use seccompiler::{BpfProgram, SeccompAction};

pub use handler::{VIOLATION_EXIT_STATUS, VIOLATION_PREFIX};
use rules::Rules;

/// What a system call outside a thread's allowlist does.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SeccompLevel {
    /// The process ends with status 159 and a message naming the thread kind and the call.
    #[default]
    Enforce,
    /// The kernel logs the call (audit log) and lets it proceed.
    Log,
    /// No filters.
    Off,
}

impl SeccompLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            SeccompLevel::Enforce => "enforce",
            SeccompLevel::Log => "log",
            SeccompLevel::Off => "off",
        }
    }
}

impl std::fmt::Display for SeccompLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SeccompLevel {
    type Err = SeccompError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "enforce" => Ok(SeccompLevel::Enforce),
            "log" => Ok(SeccompLevel::Log),
            "off" => Ok(SeccompLevel::Off),
            other => Err(SeccompError::UnknownLevel(other.to_string())),
        }
    }
}

/// The kinds of thread dormouse starts, each with its own allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The CLI's main thread once its VM is built: waits for the end, tears down, exits
    /// (starting the teardown helper).
    Main,
    /// A vCPU thread: `KVM_RUN`, port-I/O and MMIO exits into the devices, state reads for a
    /// snapshot.
    Vcpu,
    /// The device thread (event loop): queues, disk files, TAPs, vsock sockets, stdin.
    Devices,
    /// The control API's accept thread and its connection threads (pause, snapshot, …).
    Api,
    /// The guest agent's readiness listener and its connection threads.
    AgentReady,
    /// The CLI's signal thread (SIGINT/SIGTERM/SIGHUP stop the VM).
    Signals,
    /// The helper process that holds the VM for KVM's teardown after the CLI exits.
    Teardown,
    /// The threads filling a lazily restored VM's memory from a snapshot store.
    StoreFetch,
    /// The threads writing a live snapshot's memory while the guest runs.
    SnapshotWriter,
    /// `dormouse firecracker`'s periodic flush of its metrics file.
    Metrics,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 10] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Devices,
        ThreadKind::Api,
        ThreadKind::AgentReady,
        ThreadKind::Signals,
        ThreadKind::Teardown,
        ThreadKind::StoreFetch,
        ThreadKind::SnapshotWriter,
        ThreadKind::Metrics,
    ];

    /// The name the violation message gives.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
            ThreadKind::Api => "api",
            ThreadKind::AgentReady => "agent-ready",
            ThreadKind::Signals => "signals",
            ThreadKind::Teardown => "teardown",
            ThreadKind::StoreFetch => "store-fetch",
            ThreadKind::SnapshotWriter => "snapshot-writer",
            ThreadKind::Metrics => "metrics",
        }
    }

    /// The number a trap of this kind's filter carries (`SECCOMP_RET_DATA`, 1-based).
    fn id(self) -> u16 {
        match self {
            ThreadKind::Main => 1,
            ThreadKind::Vcpu => 2,
            ThreadKind::Devices => 3,
            ThreadKind::Api => 4,
            ThreadKind::AgentReady => 5,
            ThreadKind::Signals => 7,
            ThreadKind::Teardown => 8,
            ThreadKind::StoreFetch => 9,
            ThreadKind::SnapshotWriter => 10,
            ThreadKind::Metrics => 11,
        }
    }

    fn from_id(id: u16) -> Option<Self> {
        ThreadKind::ALL.into_iter().find(|k| k.id() == id)
    }
}

/// What varies a kind's allowlist besides its kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FilterOptions {
    /// The VM's vsock may start the vhost-kernel datapath: vCPU threads (where the guest
    /// driver's activation lands) may open `/dev/vhost-vsock` and issue vhost ioctls.
    pub vhost_vsock: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("unknown seccomp level {0:?} (expected enforce, log or off)")]
    UnknownLevel(String),
    #[error("building the {kind} seccomp filter: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("installing the {kind} seccomp filter: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// Whether a panic prints a symbolized backtrace (`RUST_BACKTRACE` or `RUST_LIB_BACKTRACE` set
/// to something other than `0`), read once per process like std does.
pub fn backtraces_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        ["RUST_BACKTRACE", "RUST_LIB_BACKTRACE"]
            .iter()
            .any(|var| std::env::var_os(var).is_some_and(|v| v != "0"))
    })
}

/// The allowlist of `kind`. With backtraces enabled ([`backtraces_enabled`]) every kind but
/// the teardown helper (which cannot panic) may also read files, so that a panic on a VM
/// thread still ends only its VM, with its backtrace printed: production runs without it.
pub fn allowlist(kind: ThreadKind, options: FilterOptions) -> Rules {
    let rules = kind_allowlist(kind, options);
    if backtraces_enabled() && kind != ThreadKind::Teardown {
        rules.backtraces()
    } else {
        rules
    }
}

fn kind_allowlist(kind: ThreadKind, options: FilterOptions) -> Rules {
    match kind {
        ThreadKind::Main => main_thread::rules(),
        ThreadKind::Vcpu => vcpu::rules(options.vhost_vsock),
        ThreadKind::Devices => devices::rules(),
        ThreadKind::Api => api::rules(),
        ThreadKind::AgentReady => agent_ready::rules(),
        ThreadKind::Signals => signals::rules(),
        ThreadKind::Teardown => teardown::rules(),
        ThreadKind::StoreFetch => store_fetch::rules(),
        ThreadKind::SnapshotWriter => snapshot_writer::rules(),
        ThreadKind::Metrics => metrics_flush::rules(),
    }
}

const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_TRAP: u32 = 0x0003_0000;

/// Compiles the BPF program of `kind` at `level` (`Off` has none: an empty program).
pub fn program(
    kind: ThreadKind,
    level: SeccompLevel,
    options: FilterOptions,
) -> Result<BpfProgram, SeccompError> {
    let mismatch = match level {
        SeccompLevel::Off => return Ok(Vec::new()),
        SeccompLevel::Enforce => SeccompAction::Trap,
        SeccompLevel::Log => SeccompAction::Log,
    };
    let build = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let mut program = layout::assemble(allowlist(kind, options), mismatch).map_err(build)?;
    // Every trap says which kind of thread it came from: the SIGSYS handler reads it from
    // `si_errno` (SECCOMP_RET_DATA), which works even in the teardown helper, a process that
    // shares the main thread's thread-local storage.
    for insn in &mut program {
        if insn.code == BPF_RET_K && insn.k == SECCOMP_RET_TRAP {
            insn.k |= u32::from(kind.id());
        }
    }
    Ok(program)
}

type Cache = Mutex<HashMap<(ThreadKind, SeccompLevel, FilterOptions), Arc<BpfProgram>>>;

/// The compiled program, built once per process for each combination.
pub fn cached_program(
    kind: ThreadKind,
    level: SeccompLevel,
    options: FilterOptions,
) -> Result<Arc<BpfProgram>, SeccompError> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (kind, level, options);
    if let Some(program) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(program.clone());
    }
    let program = Arc::new(program(kind, level, options)?);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, program.clone());
    Ok(program)
}

/// Prepares the process for filters at `level`: the SIGSYS handler for `Enforce` (once per
/// process). [`install`] calls it; a process that installs filters in a helper (the teardown
/// helper) calls it before starting that helper.
pub fn prepare(level: SeccompLevel) -> Result<(), SeccompError> {
    if level == SeccompLevel::Enforce {
        handler::install_once().map_err(SeccompError::Handler)?;
    }
    Ok(())
}

/// Installs `kind`'s filter on the calling thread (and everything it starts later).
pub fn install(kind: ThreadKind, level: SeccompLevel) -> Result<(), SeccompError> {
    install_with(kind, level, FilterOptions::default())
}

/// The start hook of every store-fetch thread (a lazy restore's fault and fetch threads, the
/// store client's runtime threads): installs the `store-fetch` filter at `level`.
pub fn store_fetch_hook(level: SeccompLevel) -> impl Fn() + Send + Sync + Clone + 'static {
    move || {
        if let Err(e) = install(ThreadKind::StoreFetch, level) {
            tracing::error!("{e}");
        }
    }
}

/// The start hook of a live snapshot's writer and fault handler: installs the
/// `snapshot-writer` filter at `level`.
pub fn snapshot_writer_hook(level: SeccompLevel) -> impl Fn() + Send + Sync + Clone + 'static {
    move || {
        if let Err(e) = install(ThreadKind::SnapshotWriter, level) {
            tracing::error!("{e}");
        }
    }
}

/// [`install`] with options (the vCPU threads of a VM with vhost-vsock).
pub fn install_with(
    kind: ThreadKind,
    level: SeccompLevel,
    options: FilterOptions,
) -> Result<(), SeccompError> {
    if level == SeccompLevel::Off {
        return Ok(());
    }
    prepare(level)?;
    let program = cached_program(kind, level, options)?;
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install {
        kind: kind.name(),
        source,
    })?;
    tracing::debug!("seccomp: {} filter installed ({level})", kind.name());
    Ok(())
}

#[cfg(test)]
mod tests;
