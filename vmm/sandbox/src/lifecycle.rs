//! The lifecycle steps of a sandbox that exists: reaching its agent after a start, hibernate,
//! wake, checkpoint, watching for failure, and freeing its VM. Each step holds the sandbox's
//! phase lock for writing, so steps on one sandbox never interleave; steps on different
//! sandboxes run in parallel. Each step works on either backend (`backend::Backend`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use agent_client::AgentClientConfig;

use super::agent_link::{self, StartKind};
use super::backend::{Backend, Ended};
use super::checkpoint_files::{self, DiskPlan};
use super::config::SnapshotOptions;
use super::error::{Result, SandboxError};
use super::instance::{Live, Phase, SandboxState, Slot, StopReason, WakeAhead};
use super::process::{
    Launch, LaunchDisk, LaunchNic, RestoreLaunch, SandboxProcess, SnapshotStep, StartRequest,
};
use super::start;
use super::tasks::{agent_call, blocking, blocking_in_place};
use super::timings::StartTimings;
use super::warm_pool::WarmPool;
use super::SandboxId;
use snapshot::TargetPolicy;
use vmm::hypervisor::vcpu::ExitSink;
use vmm::vm::SnapshotOutcome;
use vmm::vm::{Vm, VmController};

/// Stops a VM and frees its memory (joins its threads: blocking).
pub async fn free_vm(vm: Vm) {
    if blocking("freeing the VM", move || drop(vm)).await.is_err() {
        tracing::warn!("freeing a VM panicked");
    }
}

/// Ends a running backend on purpose: frees the in-process VM, or stops the process (its
/// API's shutdown, then SIGKILL after the grace period).
pub async fn stop(backend: Backend, grace: Duration) {
    match backend {
        Backend::InProcess { vm, vsock } => {
            drop(vsock);
            free_vm(vm).await;
        }
        Backend::Process(process) => {
            process.stop(grace).await;
        }
    }
}

fn grace(slot: &Slot) -> Duration {
    slot.process
        .as_ref()
        .map_or(Duration::from_secs(5), |p| p.stop_grace())
}

/// Waits for the agent of a VM that just started in this process, sets the guest clock to
/// the host's, and returns the running sandbox. Frees the VM on failure.
pub async fn connect_live(
    id: &SandboxId,
    vm: Vm,
    kind: StartKind,
    timeout: Duration,
    client: AgentClientConfig,
    vm_start: Duration,
) -> Result<(Live, StartTimings)> {
    let ctl = vm.controller();
    let Some(vsock) = ctl.vsock() else {
        drop(ctl);
        free_vm(vm).await;
        return Err(SandboxError::NoVsock { id: id.clone() });
    };
    let started = Instant::now();
    let waited = agent_link::wait_for_agent(&ctl, &vsock, kind, timeout, client).await;
    // No controller may outlive the VM's owner: it would keep the guest memory alive.
    drop(ctl);
    let agent = match waited {
        Ok(agent) => agent,
        Err(last_error) => {
            free_vm(vm).await;
            return Err(SandboxError::AgentNotReady {
                id: id.clone(),
                timeout,
                last_error,
            });
        }
    };
    let agent_ready = started.elapsed();
    let started = Instant::now();
    // A restored guest's wall clock is the snapshot's; a booted one may have no RTC at all.
    if let Err(e) = agent_call(id, "set_time", timeout, agent.set_time(SystemTime::now())).await {
        tracing::warn!("{e}");
    }
    let timings = StartTimings {
        vm_start,
        agent_ready,
        set_time: started.elapsed(),
    };
    Ok((
        Live {
            backend: Backend::InProcess { vm, vsock },
            agent,
        },
        timings,
    ))
}

/// Watches the running backend of `slot`: when its VM ends without the manager asking (the
/// guest powers off or panics, the VMM fails, its process dies), the sandbox is marked
/// [`SandboxState::Stopped`] with the [`StopReason`](super::instance::StopReason) and its VM is
/// freed, so a worker never keeps a half-dead sandbox. No thread per sandbox: a small task
/// waits for the exit report.
pub fn watch_for_failure(slot: &Arc<Slot>, live: &Live) {
    match &live.backend {
        Backend::InProcess { vm, .. } => watch_in_process(slot, vm.exit_sink()),
        Backend::Process(process) => watch_process(slot, Arc::clone(process)),
    }
}

fn watch_in_process(slot: &Arc<Slot>, exit: Arc<ExitSink>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    exit.on_exit(Box::new(move |reason| {
        let _ = tx.send(reason.clone());
    }));
    let slot = Arc::downgrade(slot);
    tokio::spawn(async move {
        let Ok(reason) = rx.await else { return };
        if Ended::of_exit(&reason).is_none() {
            return;
        }
        // A removed sandbox has no record left to mark.
        let Some(slot) = slot.upgrade() else { return };
        let mut phase = slot.phase.write().await;
        // Another step (kill, hibernate) may have replaced this VM meanwhile. The
        // controller's reason: a reset after a console panic is a guest panic.
        let ended = match &*phase {
            Phase::Running(live) if live.owns_exit(&exit) => live.backend.ended(),
            _ => None,
        };
        let Some(ended) = ended else { return };
        let Phase::Running(live) = std::mem::replace(&mut *phase, Phase::Gone) else {
            return;
        };
        drop(live.agent);
        stop(live.backend, Duration::ZERO).await;
        // Freeing the VM closed the console pipe: its last lines reach the file.
        if let Some(log) = &slot.console_log {
            log.drained(Duration::from_secs(2)).await;
        }
        let reason = slot.stop_reason(ended);
        tracing::warn!("sandbox {}: its VM ended: {reason:?}", slot.id);
        slot.mark_stopped(reason);
    });
}

fn watch_process(slot: &Arc<Slot>, process: Arc<SandboxProcess>) {
    let weak_slot = Arc::downgrade(slot);
    let weak_process = Arc::downgrade(&process);
    // Only a receiver while waiting: the phase owns the process, and dropping it (a manager
    // dropped without `kill`) must still end the process.
    let mut exit = process.exit_watch();
    drop(process);
    tokio::spawn(async move {
        let Ok(info) = exit.wait_for(Option::is_some).await.map(|i| i.clone()) else {
            return;
        };
        let Some(info) = info else { return };
        let Some(slot) = weak_slot.upgrade() else {
            return;
        };
        let Some(process) = weak_process.upgrade() else {
            return;
        };
        if process.exit_expected() {
            return;
        }
        let mut phase = slot.phase.write().await;
        let ours = matches!(&*phase, Phase::Running(Live { backend: Backend::Process(p), .. }) if Arc::ptr_eq(p, &process));
        if !ours || process.exit_expected() {
            return;
        }
        // The console pump ends with the process: let it write the last lines first.
        if let Some(log) = &slot.console_log {
            log.drained(Duration::from_secs(2)).await;
        }
        let reason = slot.stop_reason(Ended::of_process(&info));
        tracing::warn!("sandbox {}: its process ended: {}", slot.id, info.reason);
        *phase = Phase::Gone;
        slot.mark_stopped(reason);
    });
}

/// Pauses the in-process VM, flushes its writable disk files, snapshots it to `dir` and — for
/// a checkpoint — copies those disks into `dir` at the same instant. Resumes the VM afterwards
/// when `resume`, and always on failure. `replace`: see [`SnapshotOptions::replace`].
fn snapshot_paused(
    id: &SandboxId,
    ctl: &VmController,
    dir: &Path,
    disks: &DiskPlan,
    copy_disks: bool,
    replace: bool,
    resume: bool,
) -> Result<SnapshotOutcome> {
    ctl.pause().map_err(|source| SandboxError::VmControl {
        id: id.clone(),
        operation: "pause",
        source,
    })?;
    let result = snapshot_and_copy(id, ctl, dir, disks, copy_disks, replace);
    if resume || result.is_err() {
        if let Err(e) = ctl.resume() {
            tracing::warn!("sandbox {id}: resuming after a snapshot: {e}");
        }
    }
    result
}

fn snapshot_and_copy(
    id: &SandboxId,
    ctl: &VmController,
    dir: &Path,
    disks: &DiskPlan,
    copy_disks: bool,
    replace: bool,
) -> Result<SnapshotOutcome> {
    disks.flush()?;
    let target = if copy_disks {
        // A checkpoint's disk copies and `sandbox.json` are part of it: replaced with it.
        TargetPolicy {
            replace,
            companions: Some(checkpoint_files::is_checkpoint_file),
        }
    } else {
        TargetPolicy {
            replace,
            companions: None,
        }
    };
    let outcome = ctl
        .snapshot(dir, false, target)
        .map_err(|source| SandboxError::Snapshot {
            id: id.clone(),
            dir: dir.to_path_buf(),
            source: Box::new(source),
        })?;
    if copy_disks {
        disks.copy_into(dir)?;
    }
    Ok(outcome)
}

fn absolute(dir: &Path) -> Result<PathBuf> {
    std::path::absolute(dir).map_err(|e| SandboxError::io("resolving", dir, e))
}

fn disk_plan(slot: &Slot) -> DiskPlan {
    DiskPlan::of(
        slot.description
            .disks
            .iter()
            .map(|d| (d.path.clone(), d.read_only)),
    )
}

/// Snapshots a running backend to `dir`. In-process: the VM is handed to the blocking step
/// and back. `resume = false` (hibernate) leaves it paused on success. The outer error: the
/// blocking task was lost, and the in-process VM with it.
async fn snapshot_backend(
    slot: &Slot,
    backend: Backend,
    dir: &Path,
    copy_disks: bool,
    replace: bool,
    resume: bool,
) -> Result<(Backend, Result<SnapshotOutcome>)> {
    let disks = disk_plan(slot);
    let (id, dir) = (slot.id.clone(), dir.to_path_buf());
    match backend {
        Backend::InProcess { vm, vsock } => {
            let done = blocking("snapshot", move || {
                let ctl = vm.controller();
                let result = snapshot_paused(&id, &ctl, &dir, &disks, copy_disks, replace, resume);
                // The last handle must go for the memory to be freed.
                drop(ctl);
                (vm, result)
            })
            .await;
            let (vm, result) = done?;
            Ok((Backend::InProcess { vm, vsock }, result))
        }
        Backend::Process(process) => {
            let p = Arc::clone(&process);
            let result = blocking("snapshot", move || {
                p.snapshot_step(SnapshotStep {
                    id: &id,
                    dir: &dir,
                    disks: &disks,
                    copy_disks,
                    replace,
                    resume,
                })
            })
            .await
            .and_then(|r| r);
            Ok((Backend::Process(process), result))
        }
    }
}

/// Agent SyncFs, then pause + flush + snapshot, then the VM is stopped and its memory freed.
/// On failure the sandbox keeps running.
pub async fn hibernate(
    slot: &Slot,
    dir: &Path,
    options: SnapshotOptions,
) -> Result<SnapshotOutcome> {
    hibernate_into(slot, dir, options, false).await
}

/// [`hibernate`] into a checkpoint: `dir` (missing or empty) also gets copies of the writable
/// disks and `sandbox.json`, so it restores anywhere as a template.
pub async fn hibernate_checkpoint(slot: &Slot, dir: &Path) -> Result<SnapshotOutcome> {
    hibernate_into(slot, dir, SnapshotOptions::default(), true).await
}

async fn hibernate_into(
    slot: &Slot,
    dir: &Path,
    options: SnapshotOptions,
    copy_disks: bool,
) -> Result<SnapshotOutcome> {
    let dir = absolute(dir)?;
    // The snapshot this library wrote there and woke the sandbox from is its own to replace
    // (the woken VM maps its memory privately; replacing unlinks, never truncates, that file).
    let replace = options.replace
        || slot
            .own_hibernation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            == Some(dir.as_path());
    let mut phase = slot.phase.write().await;
    let agent = match &*phase {
        Phase::Running(live) => live.agent.clone(),
        other => return Err(slot.wrong_state(other, "hibernate", "running")),
    };
    // The guest writes its dirty page cache to the disks first, so the disk files are complete
    // on their own, not only together with the snapshot's memory.
    agent_call(&slot.id, "sync_fs", slot.agent_timeout, agent.sync_fs()).await?;
    drop(agent);
    let Phase::Running(live) = std::mem::replace(&mut *phase, Phase::Gone) else {
        return Err(SandboxError::TaskLost("hibernate"));
    };
    let Live { backend, agent } = live;
    let (backend, result) =
        match snapshot_backend(slot, backend, &dir, copy_disks, replace, false).await {
            Ok(done) => done,
            Err(e) => {
                slot.mark_stopped(StopReason::VmmFailed {
                    reason: format!("hibernate lost the VM: {e}"),
                });
                return Err(e);
            }
        };
    match result {
        Ok(outcome) => {
            drop(agent);
            stop(backend, grace(slot)).await;
            if slot.process.is_none() {
                // Without them now, the wake makes or reads them.
                *slot.wake_ahead.lock().unwrap_or_else(|e| e.into_inner()) = WakeAhead {
                    metrics: start::metrics_for(&slot.id).ok(),
                    state: outcome.state.clone(),
                };
            }
            *phase = Phase::Hibernated { dir: dir.clone() };
            *slot
                .own_hibernation
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
            slot.set_summary(SandboxState::Hibernated { dir }, None);
            Ok(outcome)
        }
        Err(e) => {
            *phase = Phase::Running(Live { backend, agent });
            Err(e)
        }
    }
}

/// Restores a hibernated sandbox from `dir`, waits for its agent and sets the guest clock.
pub async fn wake(slot: &Arc<Slot>, dir: &Path, pool: &WarmPool) -> Result<StartTimings> {
    let dir = absolute(dir)?;
    let mut phase = slot.phase.write().await;
    let own = matches!(&*phase, Phase::Hibernated { dir: saved } if *saved == dir);
    match &*phase {
        Phase::Hibernated { dir: saved } if *saved != dir => tracing::info!(
            "sandbox {}: waking from {} (hibernated to {})",
            slot.id,
            dir.display(),
            saved.display()
        ),
        Phase::Hibernated { .. } => {}
        other => return Err(slot.wrong_state(other, "wake", "hibernated")),
    }
    let (live, timings) = match &slot.process {
        None => {
            let console = start::open_console(slot.console_log.as_ref())?;
            let started = Instant::now();
            let (id, restore_dir, seccomp) = (slot.id.clone(), dir.clone(), slot.seccomp);
            let pool = pool.clone();
            let ahead =
                std::mem::take(&mut *slot.wake_ahead.lock().unwrap_or_else(|e| e.into_inner()));
            let vm = blocking_in_place("wake", move || {
                start::wake(&id, &restore_dir, console, seccomp, ahead, &pool)
            })
            .await??;
            connect_live(
                &slot.id,
                vm,
                StartKind::Restored,
                slot.agent_timeout,
                slot.agent_client,
                started.elapsed(),
            )
            .await?
        }
        Some(context) => {
            let started = context
                .start(StartRequest {
                    id: &slot.id,
                    work_dir: &slot.work_dir,
                    // The saved disks and TAPs again, named so a jail brings them in.
                    launch: Launch::Restore(RestoreLaunch {
                        dir: dir.clone(),
                        disks: slot
                            .description
                            .disks
                            .iter()
                            .map(|d| LaunchDisk {
                                path: d.path.clone(),
                                read_only: d.read_only,
                            })
                            .collect(),
                        nets: slot
                            .description
                            .network
                            .iter()
                            .map(|n| LaunchNic {
                                tap: n.tap.clone(),
                                mac: n.mac,
                            })
                            .collect(),
                        cid: None,
                    }),
                    mem_mib: slot.description.mem_mib,
                    console_log: slot.console_log.clone(),
                    kind: StartKind::Restored,
                    agent_timeout: slot.agent_timeout,
                    agent_client: slot.agent_client,
                })
                .await?;
            (
                Live {
                    backend: Backend::Process(started.process),
                    agent: started.agent,
                },
                started.timings,
            )
        }
    };
    watch_for_failure(slot, &live);
    *phase = Phase::Running(live);
    *slot
        .own_hibernation
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = own.then_some(dir);
    slot.set_summary(SandboxState::Running, Some(timings));
    Ok(timings)
}

/// A snapshot of a running sandbox plus copies of its writable disks, taken while paused;
/// the sandbox then continues. `fork` and templates start from such a directory.
pub async fn checkpoint(
    slot: &Slot,
    dir: &Path,
    options: SnapshotOptions,
) -> Result<SnapshotOutcome> {
    let dir = absolute(dir)?;
    let phase = slot.phase.write().await;
    let Phase::Running(live) = &*phase else {
        return Err(slot.wrong_state(&phase, "checkpoint", "running"));
    };
    agent_call(
        &slot.id,
        "sync_fs",
        slot.agent_timeout,
        live.agent.sync_fs(),
    )
    .await?;
    let disks = disk_plan(slot);
    let id = slot.id.clone();
    // The VM stays owned by the phase; the blocking step works through a controller (or the
    // process's API).
    let outcome = match &live.backend {
        Backend::InProcess { vm, .. } => {
            let ctl = vm.controller();
            blocking("checkpoint", move || {
                snapshot_paused(&id, &ctl, &dir, &disks, true, options.replace, true)
            })
            .await??
        }
        Backend::Process(process) => {
            let process = Arc::clone(process);
            blocking("checkpoint", move || {
                process.snapshot_step(SnapshotStep {
                    id: &id,
                    dir: &dir,
                    disks: &disks,
                    copy_disks: true,
                    replace: options.replace,
                    resume: true,
                })
            })
            .await??
        }
    };
    drop(phase);
    Ok(outcome)
}
