//! The lifecycle steps of a sandbox that exists: reaching its agent after a start, hibernate,
//! wake, checkpoint, and freeing its VM. Each step holds the sandbox's phase lock for writing,
//! so steps on one sandbox never interleave; steps on different sandboxes run in parallel.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use agent_client::AgentClientConfig;

use super::agent_link::{self, StartKind};
use super::checkpoint_files::{self, CheckpointDisk, CheckpointDisks};
use super::config::SnapshotOptions;
use super::disk_copy::clone_or_copy;
use super::error::{Result, SandboxError};
use super::instance::{Live, Phase, SandboxState, Slot, StartTimings};
use super::start;
use super::SandboxId;
use snapshot::TargetPolicy;
use vmm::hypervisor::vcpu::{ExitSink, VmExit};
use vmm::vm::SnapshotOutcome;
use vmm::vm::{Vm, VmController};

/// Runs `f` on tokio's blocking pool.
pub async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| SandboxError::TaskLost(what))
}

/// Runs `fut` as its own task, so a caller that stops waiting (a dropped future, a timeout)
/// cannot leave a sandbox half-hibernated: the step completes either way.
pub async fn detached<T: Send + 'static>(
    what: &'static str,
    fut: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(fut)
        .await
        .map_err(|_| SandboxError::TaskLost(what))?
}

/// Stops a VM and frees its memory (joins its threads: blocking).
pub async fn free_vm(vm: Vm) {
    if blocking("freeing the VM", move || drop(vm)).await.is_err() {
        tracing::warn!("freeing a VM panicked");
    }
}

async fn agent_call<T>(
    id: &SandboxId,
    operation: &'static str,
    timeout: Duration,
    call: impl Future<Output = std::result::Result<T, agent_client::ClientError>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(|source| SandboxError::agent(id, operation, source)),
        Err(_) => Err(SandboxError::AgentTimeout {
            id: id.clone(),
            operation,
            timeout,
        }),
    }
}

/// Waits for the agent of a VM that just started, sets the guest clock to the host's, and
/// returns the running sandbox. Frees the VM on failure.
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
    Ok((Live { vm, vsock, agent }, timings))
}

/// Watches the running VM of `slot` (the one `exit` belongs to): when it fails, the sandbox is
/// marked [`SandboxState::Failed`] with the reason and its VM is freed, so a worker never keeps
/// a half-dead sandbox. No thread per sandbox: the VM's exit report wakes a small task.
pub fn watch_for_failure(slot: &Arc<Slot>, exit: Arc<ExitSink>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    exit.on_exit(Box::new(move |reason| {
        let _ = tx.send(reason.clone());
    }));
    let slot = Arc::downgrade(slot);
    tokio::spawn(async move {
        let Ok(VmExit::Failed(reason)) = rx.await else {
            return;
        };
        // A killed sandbox is gone from the registry; nothing to mark.
        let Some(slot) = slot.upgrade() else { return };
        let mut phase = slot.phase.write().await;
        // Another step (kill, hibernate) may have replaced this VM meanwhile.
        if !matches!(&*phase, Phase::Running(live) if live.owns_exit(&exit)) {
            return;
        }
        tracing::error!("sandbox {}: its VM failed: {reason}", slot.id);
        if let Phase::Running(live) = std::mem::replace(&mut *phase, Phase::Gone) {
            drop(live.agent);
            free_vm(live.vm).await;
        }
        slot.set_summary(SandboxState::Failed { reason }, None);
    });
}

/// What a snapshot step needs to know about the sandbox's disks.
struct DiskPlan {
    /// Writable disk files, flushed before the snapshot.
    writable: Vec<PathBuf>,
    /// Every disk in the VM's order (path, read-only), for a checkpoint's disk copies.
    all: Vec<(PathBuf, bool)>,
}

impl DiskPlan {
    fn of(slot: &Slot) -> Self {
        let all: Vec<(PathBuf, bool)> = slot
            .description
            .disks
            .iter()
            .map(|d| (d.path.clone(), d.read_only))
            .collect();
        let writable = all
            .iter()
            .filter(|(_, ro)| !ro)
            .map(|(p, _)| p.clone())
            .collect();
        Self { writable, all }
    }
}

/// Pauses the VM, flushes its writable disk files, snapshots it to `dir` and — for a
/// checkpoint — copies those disks into `dir` at the same instant. Resumes the VM afterwards
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
    for path in &disks.writable {
        // The device writes through the page cache; fsync on any fd of the file flushes it.
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| SandboxError::io("flushing disk", path, e))?;
    }
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
        let mut listed = Vec::with_capacity(disks.all.len());
        for (index, (original, read_only)) in disks.all.iter().enumerate() {
            let copy = if *read_only {
                None
            } else {
                let name = checkpoint_files::copy_name(index);
                let to = dir.join(&name);
                clone_or_copy(original, &to).map_err(|source| SandboxError::DiskCopy {
                    from: original.clone(),
                    to,
                    source,
                })?;
                Some(name)
            };
            listed.push(CheckpointDisk {
                original: original.clone(),
                read_only: *read_only,
                copy,
            });
        }
        checkpoint_files::write(dir, &CheckpointDisks::new(listed))?;
    }
    Ok(outcome)
}

fn absolute(dir: &Path) -> Result<PathBuf> {
    std::path::absolute(dir).map_err(|e| SandboxError::io("resolving", dir, e))
}

/// Agent SyncFs, then pause + flush + snapshot, then the VM is stopped and its memory freed.
/// On failure the sandbox keeps running.
pub async fn hibernate(
    slot: &Slot,
    dir: &Path,
    options: SnapshotOptions,
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
    let Live { vm, vsock, agent } = live;
    let disks = DiskPlan::of(slot);
    let (id, snapshot_dir) = (slot.id.clone(), dir.clone());
    let result = blocking("hibernate", move || {
        let ctl = vm.controller();
        let result = snapshot_paused(&id, &ctl, &snapshot_dir, &disks, false, replace, false);
        // The last handle must go for the memory to be freed.
        drop(ctl);
        match result {
            Ok(outcome) => {
                drop(vm);
                Ok(outcome)
            }
            Err(e) => Err((vm, e)),
        }
    })
    .await;
    match result {
        Ok(Ok(outcome)) => {
            drop(agent);
            *phase = Phase::Hibernated { dir: dir.clone() };
            *slot
                .own_hibernation
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
            slot.set_summary(SandboxState::Hibernated { dir }, None);
            Ok(outcome)
        }
        Ok(Err((vm, e))) => {
            *phase = Phase::Running(Live { vm, vsock, agent });
            Err(e)
        }
        Err(e) => {
            slot.set_summary(SandboxState::Stopped, None);
            Err(e)
        }
    }
}

/// Restores a hibernated sandbox from `dir`, waits for its agent and sets the guest clock.
pub async fn wake(slot: &Arc<Slot>, dir: &Path) -> Result<StartTimings> {
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
    let console = start::open_console(slot.console_log.as_deref())?;
    let started = Instant::now();
    let (id, restore_dir, seccomp) = (slot.id.clone(), dir.clone(), slot.seccomp);
    let vm = blocking("wake", move || {
        start::wake(&id, &restore_dir, console, seccomp)
    })
    .await??;
    let (live, timings) = connect_live(
        &slot.id,
        vm,
        StartKind::Restored,
        slot.agent_timeout,
        slot.agent_client,
        started.elapsed(),
    )
    .await?;
    let exit = live.vm.exit_sink();
    *phase = Phase::Running(live);
    *slot
        .own_hibernation
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = own.then_some(dir);
    slot.set_summary(SandboxState::Running, Some(timings));
    watch_for_failure(slot, exit);
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
    // The VM stays owned by the phase; the blocking step works through a controller.
    let ctl = live.vm.controller();
    let disks = DiskPlan::of(slot);
    let id = slot.id.clone();
    let outcome = blocking("checkpoint", move || {
        snapshot_paused(&id, &ctl, &dir, &disks, true, options.replace, true)
    })
    .await??;
    drop(phase);
    Ok(outcome)
}
