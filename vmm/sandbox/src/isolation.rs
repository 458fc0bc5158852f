//! How a manager isolates its sandboxes: each in its own jailed `dormouse` process (the
//! default, for untrusted code), or all inside the worker's process (trusted use, tests).

use std::path::PathBuf;
use std::time::Duration;

/// `ManagerConfig::isolation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// Every sandbox VM runs in the worker's own process (threads of the worker). A seccomp
    /// violation or a VMM bug reachable by a guest affects the whole worker. For trusted code
    /// and tests.
    InProcess,
    /// Every running sandbox is its own `dormouse run|restore` process, started and supervised
    /// by the manager through its control API socket and hybrid vsock socket; jailed by
    /// default (`dormouse jail`). A sandbox process that dies is reported as
    /// `SandboxState::Failed` with its reason; the worker carries on.
    Process(ProcessIsolation),
}

impl Default for Isolation {
    fn default() -> Self {
        Self::Process(ProcessIsolation::default())
    }
}

/// `Isolation::Process`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessIsolation {
    /// The `dormouse` binary. `None`: found at `SandboxManager::new` as `$DORMOUSE_BIN`, else
    /// `dormouse` next to the current executable, else on `PATH` (an error lists where it
    /// looked).
    pub binary: Option<PathBuf>,
    /// Run each sandbox under `dormouse jail` (chroot, own uid/gid, cgroup limits, rlimits, a
    /// PID namespace). On by default; needs root (`SandboxManager::new` fails otherwise: set
    /// `jail: None` explicitly to run unjailed).
    pub jail: Option<JailSettings>,
    /// How long `kill` and `hibernate` wait for a process to end after asking its API to shut
    /// down, before SIGKILL.
    pub stop_grace: Duration,
}

impl Default for ProcessIsolation {
    fn default() -> Self {
        Self {
            binary: None,
            jail: Some(JailSettings::default()),
            stop_grace: Duration::from_secs(5),
        }
    }
}

impl ProcessIsolation {
    /// Unjailed sandbox processes (own process, seccomp, no chroot or uid change): for hosts
    /// where the worker is not root, and tests.
    pub fn unjailed() -> Self {
        Self {
            jail: None,
            ..Self::default()
        }
    }
}

/// Default memory a sandbox process may use beyond its guest RAM (VMM heap, thread stacks,
/// device buffers, the snapshot writer): 128 MiB.
pub const DEFAULT_MEMORY_OVERHEAD_MIB: u64 = 128;

/// What `dormouse jail` is asked to do for each sandbox process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSettings {
    /// `--chroot-base`: each sandbox's root is `<chroot_base>/<jail id>/root`.
    pub chroot_base: PathBuf,
    /// Per-sandbox uid (= gid) from `first_uid .. first_uid + uid_count`, one per live sandbox,
    /// reused after kill.
    pub first_uid: u32,
    pub uid_count: u32,
    /// `None`: detected (`/sys/fs/cgroup/cgroup.controllers` present: v2, else v1).
    pub cgroup_version: Option<CgroupVersion>,
    /// Memory limit = guest RAM + this.
    pub memory_overhead_mib: u64,
    /// `pids.max` (threads count: vCPUs, device thread, API threads, …).
    pub pids_max: u32,
    /// Optional CPU quota: `quota_us` per `period_us`.
    pub cpu_quota: Option<CpuQuota>,
    /// `--rlimit nofile=N`.
    pub nofile: u64,
    /// `--new-pid-ns`.
    pub new_pid_ns: bool,
}

impl Default for JailSettings {
    fn default() -> Self {
        Self {
            chroot_base: PathBuf::from("/srv/dormouse"),
            first_uid: 200_000,
            uid_count: 65_536,
            cgroup_version: None,
            memory_overhead_mib: DEFAULT_MEMORY_OVERHEAD_MIB,
            pids_max: 256,
            cpu_quota: None,
            nofile: 4096,
            new_pid_ns: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    pub fn detect() -> Self {
        if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            Self::V2
        } else {
            Self::V1
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuQuota {
    pub quota_us: u64,
    pub period_us: u64,
}
