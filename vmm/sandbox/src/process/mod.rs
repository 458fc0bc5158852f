//! Process isolation: each running sandbox is its own (by default jailed) `dormouse run|restore`
//! process, supervised by the manager.
//!
//! Modules, one job each: `access` (what a jailed uid may open), `binary` (finding `dormouse`), `args` (the command line, a pure
//! function), `paths` (sockets and staging directories inside and outside the jail), `uids`
//! (per-sandbox uids), `child` (spawning, watching and stopping a process), `exit_reason`
//! (why it ended), `launch` (start + agent readiness), `steps` (snapshots over the API),
//! `snapshot_move` (staging → the caller's directory under the target rules).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

mod access;
mod args;
mod binary;
mod child;
mod exit_reason;
#[cfg(feature = "fault-injection")]
mod fault;
mod launch;
mod paths;
mod snapshot_move;
mod steps;
mod uids;

pub(crate) use args::{Launch, LaunchDisk, RestoreLaunch, RunLaunch, SandboxNic as LaunchNic};
pub(crate) use child::{ExitInfo, SandboxProcess};
pub(crate) use exit_reason::GUEST_PANIC_LINE;
pub(crate) use launch::StartRequest;
pub(crate) use steps::SnapshotStep;

use crate::error::{Result, SandboxError};
use crate::isolation::{CgroupVersion, JailSettings, ProcessIsolation};
use vmm::SeccompLevel;

/// A manager's settings for its sandbox processes, resolved once at `SandboxManager::new`.
#[derive(Debug)]
pub(crate) struct ProcessContext {
    binary: PathBuf,
    jail: Option<(JailSettings, CgroupVersion)>,
    stop_grace: Duration,
    /// Unique per manager in this process: jail ids are `<tag>-<sandbox id>`.
    tag: String,
    seccomp: SeccompLevel,
    /// Jailed: each live sandbox's uid (= gid), held from its first start until `release`.
    uids: Mutex<HashMap<crate::SandboxId, uids::UidLease>>,
}

impl ProcessContext {
    pub fn new(isolation: &ProcessIsolation, seccomp: SeccompLevel) -> Result<Self> {
        let binary = binary::find(isolation.binary.as_deref()).map_err(SandboxError::Isolation)?;
        let jail = match &isolation.jail {
            None => None,
            Some(settings) => {
                // SAFETY: geteuid has no arguments and cannot fail.
                jail_allowed(unsafe { libc::geteuid() })?;
                let version = settings
                    .cgroup_version
                    .unwrap_or_else(CgroupVersion::detect);
                Some((settings.clone(), version))
            }
        };
        static MANAGERS: AtomicU64 = AtomicU64::new(0);
        let tag = format!(
            "dm{:x}m{}",
            std::process::id(),
            MANAGERS.fetch_add(1, Ordering::Relaxed)
        );
        tracing::info!(
            "sandbox processes: {} ({})",
            binary.display(),
            if jail.is_some() { "jailed" } else { "unjailed" }
        );
        Ok(Self {
            binary,
            jail,
            stop_grace: isolation.stop_grace,
            tag,
            seccomp,
            uids: Mutex::new(HashMap::new()),
        })
    }

    /// Jailed: the sandbox's uid, leased on first use. Unjailed: `None`.
    fn sandbox_uid(&self, id: &crate::SandboxId) -> Result<Option<u32>> {
        let Some((settings, _)) = &self.jail else {
            return Ok(None);
        };
        let mut uids = self.uids.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lease) = uids.get(id) {
            return Ok(Some(lease.uid()));
        }
        let lease = uids::lease(settings.first_uid, settings.uid_count).ok_or_else(|| {
            SandboxError::Isolation(format!(
                "no free uid in {}..{} for another jailed sandbox",
                settings.first_uid,
                settings.first_uid.saturating_add(settings.uid_count)
            ))
        })?;
        let uid = lease.uid();
        uids.insert(id.clone(), lease);
        Ok(Some(uid))
    }

    /// The sandbox is gone (killed, or its create failed): what its jail left (a jail whose
    /// supervisor was killed cannot clean up) is removed and its uid may be reused.
    pub fn release(&self, id: &crate::SandboxId) {
        if let Some((settings, _)) = &self.jail {
            let dir = settings.chroot_base.join(self.jail_id(id));
            if dir.exists() {
                remove_jail_dir(&dir);
            }
        }
        self.uids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    pub fn stop_grace(&self) -> Duration {
        self.stop_grace
    }

    fn jail_id(&self, id: &crate::SandboxId) -> String {
        format!("{}-{id}", self.tag)
    }

    /// Where the sandbox's sockets and staging directories are.
    pub fn paths(&self, id: &crate::SandboxId, work_dir: &Path) -> paths::ProcessPaths {
        match &self.jail {
            Some((settings, _)) => {
                paths::ProcessPaths::jailed(work_dir, &settings.chroot_base, &self.jail_id(id))
            }
            None => paths::ProcessPaths::unjailed(work_dir),
        }
    }

    /// `--mem-dir` for a sandbox that keeps its RAM in its work directory.
    pub fn mem_dir_arg(&self, id: &crate::SandboxId, work_dir: &Path) -> PathBuf {
        self.paths(id, work_dir).mem_dir_arg()
    }

    /// The cgroup limits for a sandbox with `mem_mib` of guest RAM.
    fn cgroups(
        settings: &JailSettings,
        version: CgroupVersion,
        mem_mib: u64,
    ) -> Vec<(String, String)> {
        let bytes = mem_mib
            .saturating_add(settings.memory_overhead_mib)
            .saturating_mul(1 << 20)
            .to_string();
        let mut out = match version {
            CgroupVersion::V2 => vec![
                ("memory.max".to_string(), bytes),
                ("pids.max".to_string(), settings.pids_max.to_string()),
            ],
            CgroupVersion::V1 => vec![
                ("memory.limit_in_bytes".to_string(), bytes),
                ("pids.max".to_string(), settings.pids_max.to_string()),
            ],
        };
        if let Some(q) = settings.cpu_quota {
            match version {
                CgroupVersion::V2 => {
                    out.push(("cpu.max".into(), format!("{} {}", q.quota_us, q.period_us)))
                }
                CgroupVersion::V1 => {
                    out.push(("cpu.cfs_period_us".into(), q.period_us.to_string()));
                    out.push(("cpu.cfs_quota_us".into(), q.quota_us.to_string()));
                }
            }
        }
        out
    }
}

/// The jail needs root; no silent downgrade to unjailed.
fn jail_allowed(euid: u32) -> Result<()> {
    if euid == 0 {
        return Ok(());
    }
    Err(SandboxError::Isolation(
        "the jail (ProcessIsolation::jail, on by default) needs root: run the worker as root, \
         or set `jail: None` explicitly to run sandbox processes unjailed"
            .into(),
    ))
}

/// Removes a dead jail's directory, unless something is still mounted under it (then a
/// recursive removal could reach into a bind-mounted input: it is left with a warning).
fn remove_jail_dir(dir: &Path) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|point| Path::new(point).starts_with(dir));
    if mounted || mountinfo.is_empty() {
        tracing::warn!(
            "leaving {}: something may be mounted under it",
            dir.display()
        );
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!("removing {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolation::CpuQuota;

    #[test]
    fn cgroup_limits_per_version() {
        let mut settings = JailSettings::default();
        let v2 = ProcessContext::cgroups(&settings, CgroupVersion::V2, 128);
        assert_eq!(
            v2,
            [
                ("memory.max".to_string(), (256u64 << 20).to_string()),
                ("pids.max".to_string(), "256".to_string()),
            ]
        );
        settings.cpu_quota = Some(CpuQuota {
            quota_us: 50_000,
            period_us: 100_000,
        });
        let v1 = ProcessContext::cgroups(&settings, CgroupVersion::V1, 64);
        assert_eq!(
            v1[0],
            (
                "memory.limit_in_bytes".to_string(),
                (192u64 << 20).to_string()
            )
        );
        assert!(v1.contains(&("cpu.cfs_quota_us".to_string(), "50000".to_string())));
        let v2 = ProcessContext::cgroups(&settings, CgroupVersion::V2, 64);
        assert!(v2.contains(&("cpu.max".to_string(), "50000 100000".to_string())));
    }

    #[test]
    fn a_jail_without_root_or_a_missing_binary_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ProcessIsolation {
            binary: Some(dir.path().join("no-dormouse")),
            ..ProcessIsolation::unjailed()
        };
        let err = ProcessContext::new(&missing, SeccompLevel::Enforce).unwrap_err();
        assert!(err.to_string().contains("not an executable"), "{err}");
        let err = jail_allowed(1000).unwrap_err();
        assert!(
            err.to_string().contains("needs root") && err.to_string().contains("jail: None"),
            "{err}"
        );
        assert!(jail_allowed(0).is_ok());
        // The default: Process isolation with the jail on.
        assert_eq!(
            crate::isolation::Isolation::default(),
            crate::isolation::Isolation::Process(ProcessIsolation {
                binary: None,
                jail: Some(JailSettings::default()),
                stop_grace: Duration::from_secs(5),
            })
        );
    }
}
