//! Starting a sandbox process and reaching its agent: spawn, wait for its control API to
//! answer (the VM is built or restored), then for the agent over the hybrid vsock socket, and
//! set the guest clock. The process's death at any point fails the start with its reason.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use agent_client::{AgentClient, AgentClientConfig};

use super::access::{self, Grants};
use super::args::{self, Endpoints, JailArgs, Launch, LaunchDisk};
use super::child::{SandboxProcess, Spawn};
use super::ProcessContext;
use crate::agent_link::{self, StartKind};
use crate::error::{Result, SandboxError};
use crate::tasks::{agent_call, blocking};
use crate::timings::StartTimings;
use crate::SandboxId;

/// A running sandbox process with its connected agent.
pub(crate) struct Started {
    pub process: Arc<SandboxProcess>,
    pub agent: AgentClient,
    pub timings: StartTimings,
}

/// What a start needs besides the launch itself.
pub(crate) struct StartRequest<'a> {
    pub id: &'a SandboxId,
    pub work_dir: &'a Path,
    pub launch: Launch,
    /// Guest RAM, for the jail's memory limit.
    pub mem_mib: u64,
    pub console_log: Option<crate::console_log::ConsoleLog>,
    pub kind: StartKind,
    pub agent_timeout: Duration,
    pub agent_client: AgentClientConfig,
}

const API_FIRST_BACKOFF: Duration = Duration::from_millis(1);
const API_MAX_BACKOFF: Duration = Duration::from_millis(20);

impl ProcessContext {
    /// Starts the sandbox's process and waits for its agent. On failure nothing is left
    /// running.
    pub async fn start(&self, request: StartRequest<'_>) -> Result<Started> {
        let StartRequest {
            id,
            work_dir,
            launch,
            mem_mib,
            console_log,
            kind,
            agent_timeout,
            agent_client,
        } = request;
        let paths = self.paths(id, work_dir);
        let uid = self.sandbox_uid(id)?;
        let jail = match (&self.jail, uid) {
            (Some((settings, version)), Some(uid)) => Some(JailArgs {
                id: self.jail_id(id),
                uid,
                gid: uid,
                chroot_base: settings.chroot_base.clone(),
                cgroup_version: *version,
                cgroups: Self::cgroups(settings, *version, mem_mib),
                nofile: settings.nofile,
                new_pid_ns: settings.new_pid_ns,
            }),
            _ => None,
        };
        let grants = match uid {
            Some(uid) => {
                let owned = Arc::new(std::sync::Mutex::new(Grants::new(uid)));
                let (g, for_grants, dir) =
                    (Arc::clone(&owned), launch.clone(), work_dir.to_path_buf());
                blocking("granting the jailed process its files", move || {
                    let mut g = g.lock().unwrap_or_else(|e| e.into_inner());
                    grant_inputs(&mut g, uid, &for_grants, &dir)
                })
                .await?
                .map_err(|e| {
                    SandboxError::io("giving the jailed sandbox its files in", work_dir, e)
                })?;
                Some(owned)
            }
            None => None,
        };
        let ends = Endpoints {
            api_sock: paths.api_arg(),
            vsock_uds: paths.vsock_arg(),
            console_to_stdout: console_log.is_some(),
            seccomp: self.seccomp,
            vm_id: id.to_string(),
        };
        let argv = args::command_args(jail.as_ref(), &launch, &ends)
            .map_err(SandboxError::InvalidConfig)?;
        // Sockets of an earlier process of this sandbox (before a hibernate).
        for stale in [paths.api_host(), paths.vsock_host()] {
            let _ = std::fs::remove_file(stale);
        }
        let spawn = Spawn {
            binary: self.binary.clone(),
            args: argv,
            console_log,
            paths: paths.clone(),
            uid,
            grants,
        };
        let started = Instant::now();
        let runtime = tokio::runtime::Handle::current();
        let binary = self.binary.clone();
        let process = blocking("starting the sandbox process", move || {
            SandboxProcess::spawn(spawn, &runtime)
        })
        .await?
        .map_err(|source| SandboxError::ProcessSpawn {
            id: id.clone(),
            binary,
            source,
        })?;
        match connect(
            id,
            &process,
            &paths,
            kind,
            agent_timeout,
            agent_client,
            started,
        )
        .await
        {
            Ok((agent, timings)) => Ok(Started {
                process,
                agent,
                timings,
            }),
            Err(e) => {
                process.kill_now().await;
                Err(e)
            }
        }
    }
}

/// Chowns the sandbox's own inputs (its work directory, files in it) to `uid` and grants it
/// the others through ACLs.
fn grant_inputs(
    grants: &mut Grants,
    uid: u32,
    launch: &Launch,
    work_dir: &Path,
) -> std::io::Result<()> {
    access::give(work_dir, uid)?;
    let mut disk = |d: &LaunchDisk| {
        if d.path.starts_with(work_dir) {
            access::give(&d.path, uid)
        } else {
            grants.allow(&d.path, !d.read_only)
        }
    };
    match launch {
        Launch::Run(run) => {
            for d in &run.disks {
                disk(d)?;
            }
            grants.allow(&run.kernel, false)?;
            if let Some(initrd) = &run.initrd {
                grants.allow(initrd, false)?;
            }
        }
        Launch::Restore(restore) => {
            for d in &restore.disks {
                disk(d)?;
            }
            grants.allow_snapshot_dir(&restore.dir)?;
        }
    }
    Ok(())
}

async fn connect(
    id: &SandboxId,
    process: &Arc<SandboxProcess>,
    paths: &super::paths::ProcessPaths,
    kind: StartKind,
    timeout: Duration,
    client: AgentClientConfig,
    started: Instant,
) -> Result<(AgentClient, StartTimings)> {
    let died = |info: Option<super::child::ExitInfo>| SandboxError::ProcessExited {
        id: id.clone(),
        reason: info.map_or_else(|| "its exit status was lost".into(), |i| i.reason),
    };
    let deadline = started + timeout;
    // The VM is built (or restored) once its API answers.
    let api_up = wait_for_api(process, deadline);
    let up = tokio::select! {
        up = api_up => up,
        info = process.exited() => return Err(died(info)),
    };
    if let Err(last_error) = up {
        return Err(SandboxError::AgentNotReady {
            id: id.clone(),
            timeout,
            last_error: format!("the control API did not answer: {last_error}"),
        });
    }
    let vm_start = started.elapsed();
    let ready_started = Instant::now();
    let (uds, api) = (paths.vsock_host(), paths.api_host());
    let left = deadline.saturating_duration_since(Instant::now());
    let waited = tokio::select! {
        waited = agent_link::wait_for_agent_hybrid(&uds, &api, kind, left, client) => waited,
        info = process.exited() => return Err(died(info)),
    };
    let agent = waited.map_err(|last_error| SandboxError::AgentNotReady {
        id: id.clone(),
        timeout,
        last_error,
    })?;
    let agent_ready = ready_started.elapsed();
    let set_started = Instant::now();
    // A restored guest's wall clock is the snapshot's; a booted one may have no RTC at all.
    if let Err(e) = agent_call(id, "set_time", timeout, agent.set_time(SystemTime::now())).await {
        tracing::warn!("{e}");
    }
    let timings = StartTimings {
        vm_start,
        agent_ready,
        set_time: set_started.elapsed(),
    };
    Ok((agent, timings))
}

/// Polls the process's `GET /v1/vm` until it answers.
async fn wait_for_api(
    process: &Arc<SandboxProcess>,
    deadline: Instant,
) -> std::result::Result<(), String> {
    let mut backoff = API_FIRST_BACKOFF;
    loop {
        let api = process.api().with_timeout(Duration::from_secs(5));
        let answer = tokio::task::spawn_blocking(move || api.info())
            .await
            .map_err(|_| "the API probe did not complete".to_string())?;
        let last = match answer {
            Ok(_) => return Ok(()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(API_MAX_BACKOFF);
    }
}
