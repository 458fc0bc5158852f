//! `SandboxManager`: the registry of a worker's sandboxes and their lifecycle entry points.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod agent_ops;
mod exec_sessions;
mod process_start;

use super::agent_link::StartKind;
use super::backend::Backend;
use super::config::{ForkConfig, SandboxConfig, SandboxSource, SnapshotOptions};
use super::console_log::{ConsoleLog, CONSOLE_LOG_FILE, DEFAULT_CONSOLE_LOG_BYTES};
use super::error::{Result, SandboxError};
use super::identity::Identities;
use super::instance::{
    Description, Live, Phase, SandboxInfo, SandboxOrigin, SandboxState, Slot, StopReason, Summary,
};
use super::isolation::Isolation;
use super::lifecycle;
use super::next_start::NextStart;
use super::process::{ProcessContext, StartRequest};
use super::store_wake;
use super::tasks::{blocking, blocking_in_place, detached};
use super::template_cache::TemplateCache;
use super::timings::StartTimings;
use super::warm_pool::{WarmPool, WarmPoolStats};
use super::{start, SandboxId};
use devices::virtio::vsock::defs::MIN_GUEST_CID;
use vmm::vm::SnapshotOutcome;
use vmm::vm::{ShellShape, VmController};
use vmm::SeccompLevel;

/// Where a sandbox created from a store checkpoint keeps it, inside its work directory.
const FROM_STORE_DIR: &str = "from-store";

/// What [`SandboxManager::hibernate_to`] did.
#[derive(Debug, Clone)]
pub struct HibernatedToStore {
    pub snapshot: SnapshotOutcome,
    pub pushed: snapshot_store::PushReport,
}

/// Where the manager keeps its files and where its CIDs start.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Each sandbox gets `<work_dir>/<id>/` for its private disk copies, removed on kill.
    pub work_dir: PathBuf,
    pub first_cid: u64,
    /// seccomp filters on every sandbox VM's threads (vCPUs, devices, agent readiness):
    /// enforcing by default. A violation ends the whole process (status 159, the thread kind
    /// and call on stderr), so a worker's supervisor sees it; see docs/security.md. With
    /// `Isolation::Process` that process is the sandbox's own.
    pub seccomp: SeccompLevel,
    /// One jailed `dormouse` process per sandbox (default) or every VM in this process.
    pub isolation: Isolation,
    /// Each sandbox's console is kept in `<work_dir>/<id>/console.log` (or its
    /// `SandboxConfig::console_log`): at most this many bytes, then it is rotated to
    /// `console.log.1` (so at most twice this on disk). Default 1 MiB
    /// ([`DEFAULT_CONSOLE_LOG_BYTES`]); 0 keeps no console at all.
    pub console_log_bytes: u64,
    /// How long stopped sandboxes' records (and their console logs) are kept.
    pub stopped_retention: StoppedRetention,
    /// The host's chunk cache for sandboxes created from a store (`SandboxConfig::from_store`),
    /// shared with every other process using it; `None`: `$DORMOUSE_CHUNK_CACHE`, else
    /// `/var/cache/dormouse/chunks` for root, else `~/.cache/dormouse/chunks`.
    pub chunk_cache: Option<PathBuf>,
}

/// Stopped sandboxes (killed, powered off, panicked, failed) stay listed with their
/// `StopReason` until `SandboxManager::remove`, or until one of these bounds drops the oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoppedRetention {
    /// At most this many stopped records (default 256).
    pub max_records: usize,
    /// A stopped record older than this is dropped (default 1 hour).
    pub max_age: Duration,
}

impl Default for StoppedRetention {
    fn default() -> Self {
        Self {
            max_records: 256,
            max_age: Duration::from_secs(3600),
        }
    }
}

impl ManagerConfig {
    /// Defaults: `Isolation::Process` with the jail on (needs root), seccomp enforcing.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        Self {
            work_dir: work_dir.into(),
            first_cid: MIN_GUEST_CID,
            seccomp: SeccompLevel::default(),
            isolation: Isolation::default(),
            console_log_bytes: DEFAULT_CONSOLE_LOG_BYTES,
            stopped_retention: StoppedRetention::default(),
            chunk_cache: None,
        }
    }

    /// [`Self::new`] with `isolation`.
    pub fn with_isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = isolation;
        self
    }
}

/// Many sandboxes in one process. Cheap to clone (shared state); every method is async and may
/// be called concurrently from any task. Blocking VMM work runs on tokio's blocking pool, and
/// lifecycle steps run as their own tasks, so cancelling a call never leaves a sandbox
/// half-done.
#[derive(Clone)]
pub struct SandboxManager {
    inner: Arc<Inner>,
}

struct Inner {
    work_dir: PathBuf,
    seccomp: SeccompLevel,
    ids: Identities,
    /// `Isolation::Process`: how sandbox processes are started.
    process: Option<Arc<ProcessContext>>,
    seq: AtomicU64,
    sandboxes: Mutex<HashMap<SandboxId, Arc<Slot>>>,
    console_log_bytes: u64,
    retention: StoppedRetention,
    chunk_cache: PathBuf,
    /// In-process restores take their VM shells from here ([`SandboxManager::keep_warm`]).
    warm: WarmPool,
    /// Templates and checkpoints sandboxes were created from, decoded once.
    templates: TemplateCache,
    /// The next in-process start's id, work directory and counters, made ahead.
    next_start: NextStart,
}

/// What a start has before it is planned.
#[derive(Default)]
struct Ahead {
    /// A store checkpoint's memory, served on demand.
    lazy: Option<vmm::LazyRestore>,
    /// The VM's counters, made with its identity after the previous start.
    metrics: Option<vmm::metrics::VmMetrics>,
}

impl SandboxManager {
    /// Fails when the isolation cannot be set up: `Isolation::Process` without a `dormouse`
    /// binary (the error lists where it looked), or with the jail on while not root.
    pub fn new(config: ManagerConfig) -> Result<Self> {
        let process = match &config.isolation {
            Isolation::InProcess => None,
            Isolation::Process(settings) => {
                Some(Arc::new(ProcessContext::new(settings, config.seccomp)?))
            }
        };
        std::fs::create_dir_all(&config.work_dir)
            .map_err(|e| SandboxError::io("creating", &config.work_dir, e))?;
        let work_dir = std::path::absolute(&config.work_dir)
            .map_err(|e| SandboxError::io("resolving", &config.work_dir, e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                work_dir,
                seccomp: config.seccomp,
                ids: Identities::new(config.first_cid),
                process,
                seq: AtomicU64::new(0),
                sandboxes: Mutex::new(HashMap::new()),
                console_log_bytes: config.console_log_bytes,
                retention: config.stopped_retention,
                chunk_cache: config
                    .chunk_cache
                    .clone()
                    .unwrap_or_else(snapshot_store::ChunkCache::default_dir),
                warm: WarmPool::default(),
                templates: TemplateCache::default(),
                next_start: NextStart::default(),
            }),
        })
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<SandboxId, Arc<Slot>>> {
        self.inner
            .sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn slot(&self, id: &SandboxId) -> Result<Arc<Slot>> {
        self.registry()
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::UnknownSandbox(id.clone()))
    }

    /// Creates a sandbox (boot, template restore, or a checkpoint in a snapshot store) and
    /// returns once its agent answers.
    pub async fn create(&self, config: SandboxConfig) -> Result<SandboxId> {
        let this = self.clone();
        detached("create", async move {
            let origin = match &config.source {
                SandboxSource::Boot(spec) => SandboxOrigin::Boot {
                    kernel: spec.kernel.clone(),
                },
                SandboxSource::Template(dir) => SandboxOrigin::Template { dir: dir.clone() },
                SandboxSource::Store(url) => SandboxOrigin::Store { url: url.clone() },
            };
            this.create_inner(config, origin).await
        })
        .await
    }

    /// A new, independent sandbox from a checkpoint (`checkpoint(id, dir)`): its own copy of
    /// each writable disk, its own TAPs, MACs and vsock CID.
    pub async fn fork(
        &self,
        checkpoint: impl AsRef<Path>,
        config: ForkConfig,
    ) -> Result<SandboxId> {
        let checkpoint = checkpoint.as_ref().to_path_buf();
        let this = self.clone();
        detached("fork", async move {
            let sandbox = SandboxConfig {
                source: SandboxSource::Template(checkpoint.clone()),
                network: config.network,
                console_log: config.console_log,
                agent_timeout: config.agent_timeout,
                agent_client: config.agent_client,
            };
            this.create_inner(sandbox, SandboxOrigin::Fork { checkpoint })
                .await
        })
        .await
    }

    async fn create_inner(
        &self,
        config: SandboxConfig,
        origin: SandboxOrigin,
    ) -> Result<SandboxId> {
        let inner = &self.inner;
        // In-process, the identity made after the previous start (its directory, its counters).
        let prepared = match inner.process {
            None => inner.next_start.take(),
            Some(_) => None,
        };
        let (id, metrics) = match prepared {
            Some(p) => (p.id, Some(p.metrics)),
            None => (inner.ids.sandbox_id(), None),
        };
        let work_dir = inner.work_dir.join(id.as_str());
        let console_log = (inner.console_log_bytes > 0).then(|| {
            let path = config
                .console_log
                .clone()
                .unwrap_or_else(|| work_dir.join(CONSOLE_LOG_FILE));
            ConsoleLog::new(path, inner.console_log_bytes)
        });
        // A checkpoint in a store comes into the work directory first: in-process its memory
        // stays behind, fetched on demand; a sandbox process gets it whole.
        let (config, lazy) = match &config.source {
            SandboxSource::Store(url) => {
                let dir = work_dir.join(FROM_STORE_DIR);
                let fetched = store_wake::fetch_checkpoint(
                    url,
                    &dir,
                    inner
                        .process
                        .is_none()
                        .then_some(inner.chunk_cache.as_path()),
                    inner.seccomp,
                )
                .await;
                match fetched {
                    Ok(fetched) => (
                        SandboxConfig {
                            source: SandboxSource::Template(dir),
                            ..config
                        },
                        fetched.lazy,
                    ),
                    Err(e) => {
                        clear_work_dir(work_dir, false).await;
                        return Err(e);
                    }
                }
            }
            _ => (config, None),
        };
        let started = match &inner.process {
            None => {
                self.start_in_process(
                    &id,
                    &work_dir,
                    &config,
                    &console_log,
                    origin,
                    Ahead { lazy, metrics },
                )
                .await
            }
            Some(context) => {
                self.start_process(context, &id, &work_dir, &config, &console_log, origin)
                    .await
            }
        };
        let (live, description, timings) = match started {
            Ok(started) => started,
            Err(e) => {
                // The console explains a failed boot: it stays (the rest goes).
                if let Some(log) = &console_log {
                    let tail = log
                        .tail_lines(super::instance::CONSOLE_TAIL_LINES)
                        .join("\n");
                    tracing::warn!(
                        "sandbox {id} did not start ({e}); console kept in {}, last lines:\n{tail}",
                        log.path.display()
                    );
                }
                clear_work_dir(work_dir, true).await;
                if let Some(context) = &inner.process {
                    context.release(&id);
                }
                return Err(e);
            }
        };
        let slot = Arc::new(Slot {
            id: id.clone(),
            seq: inner.seq.fetch_add(1, Ordering::Relaxed),
            work_dir,
            console_log,
            agent_timeout: config.agent_timeout,
            agent_client: config.agent_client,
            seccomp: inner.seccomp,
            process: inner.process.clone(),
            description,
            summary: Mutex::new(Summary {
                state: SandboxState::Running,
                timings,
                stopped_at: None,
            }),
            phase: tokio::sync::RwLock::new(Phase::Gone),
            own_hibernation: Mutex::new(None),
            wake_ahead: Mutex::default(),
        });
        lifecycle::watch_for_failure(&slot, &live);
        *slot.phase.write().await = Phase::Running(live);
        self.registry().insert(id.clone(), slot);
        self.prune_stopped();
        if inner.process.is_none() {
            self.prepare_next_start();
        }
        tracing::info!(
            "sandbox {id} running (VM {:?}, agent {:?})",
            timings.vm_start,
            timings.agent_ready
        );
        Ok(id)
    }

    /// Makes the next in-process start's identity in the background (`next_start`).
    fn prepare_next_start(&self) {
        let this = self.clone();
        // Fire and forget: a start that finds none ready makes its own.
        drop(tokio::task::spawn_blocking(move || {
            this.inner
                .next_start
                .prepare(&this.inner.ids, &this.inner.work_dir)
        }));
    }

    /// Plans the sandbox (disk copies, identities) on the blocking pool; `launch` turns the
    /// plan into a running VM there too (in-process), or hands it back (process).
    // The plan's inputs are independent pieces of one start; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    async fn plan<T: Send + 'static>(
        &self,
        id: &SandboxId,
        work_dir: &Path,
        config: &SandboxConfig,
        console_log: &Option<ConsoleLog>,
        origin: SandboxOrigin,
        ahead: Ahead,
        launch: impl FnOnce(process_start::Plan) -> Result<T> + Send + 'static,
    ) -> Result<(T, Description)> {
        let console = match &self.inner.process {
            None => start::open_console(console_log.as_ref())?,
            // The process writes the console; the plan's is unused.
            Some(_) => vmm::Console::Null,
        };
        let (id, work_dir, this) = (id.clone(), work_dir.to_path_buf(), self.clone());
        let (network, source) = (config.network.clone(), config.source.clone());
        blocking_in_place("starting the VM", move || {
            let placement = start::Placement {
                ids: &this.inner.ids,
                work_dir: &work_dir,
                seccomp: this.inner.seccomp,
                templates: &this.inner.templates,
                metrics: ahead.metrics,
            };
            let (plan, description) = match source {
                SandboxSource::Boot(spec) => {
                    let (c, d) = start::plan_boot(&id, spec, &network, console, placement)?;
                    (process_start::Plan::Boot(Box::new(c)), d)
                }
                SandboxSource::Template(dir) => {
                    let (mut o, d) =
                        start::plan_template(&id, &dir, &network, console, placement, origin)?;
                    o.lazy = ahead.lazy;
                    (process_start::Plan::Restore(Box::new(o)), d)
                }
                SandboxSource::Store(url) => {
                    return Err(SandboxError::InvalidConfig(format!(
                        "{url}: a store checkpoint must be fetched before planning"
                    )))
                }
            };
            Ok((launch(plan)?, description))
        })
        .await?
    }

    async fn start_in_process(
        &self,
        id: &SandboxId,
        work_dir: &Path,
        config: &SandboxConfig,
        console_log: &Option<ConsoleLog>,
        origin: SandboxOrigin,
        ahead: Ahead,
    ) -> Result<(Live, Description, StartTimings)> {
        let started = Instant::now();
        let vm_id = id.clone();
        let pool = self.inner.warm.clone();
        let (vm, description) = self
            .plan(
                id,
                work_dir,
                config,
                console_log,
                origin,
                ahead,
                move |plan| {
                    let vm_start = |source| SandboxError::VmStart {
                        id: vm_id.clone(),
                        source: Box::new(source),
                    };
                    match plan {
                        process_start::Plan::Boot(c) => vmm::Vm::start(*c).map_err(vm_start),
                        process_start::Plan::Restore(o) => pool.restore(*o).map_err(vm_start),
                    }
                },
            )
            .await?;
        let vm_start = started.elapsed();
        let kind = match description.origin {
            SandboxOrigin::Boot { .. } => StartKind::Booted,
            _ => StartKind::Restored,
        };
        let (live, timings) = lifecycle::connect_live(
            id,
            vm,
            kind,
            config.agent_timeout,
            config.agent_client,
            vm_start,
        )
        .await?;
        Ok((live, description, timings))
    }

    async fn start_process(
        &self,
        context: &Arc<ProcessContext>,
        id: &SandboxId,
        work_dir: &Path,
        config: &SandboxConfig,
        console_log: &Option<ConsoleLog>,
        origin: SandboxOrigin,
    ) -> Result<(Live, Description, StartTimings)> {
        let planning = Instant::now();
        let (plan, description) = self
            .plan(
                id,
                work_dir,
                config,
                console_log,
                origin,
                Ahead::default(),
                Ok,
            )
            .await?;
        let planned = planning.elapsed();
        let mem_dir = context.mem_dir_arg(id, work_dir);
        let launch = process_start::launch(plan, &description, &mem_dir);
        tracing::debug!("{}", process_start::describe(id, &launch));
        let kind = match description.origin {
            SandboxOrigin::Boot { .. } => StartKind::Booted,
            _ => StartKind::Restored,
        };
        let started = context
            .start(StartRequest {
                id,
                work_dir,
                launch,
                mem_mib: description.mem_mib,
                console_log: console_log.clone(),
                kind,
                agent_timeout: config.agent_timeout,
                agent_client: config.agent_client,
            })
            .await?;
        let mut timings = started.timings;
        // Disk copies are host work of the start, as in-process.
        timings.vm_start += planned;
        let live = Live {
            backend: Backend::Process(started.process),
            agent: started.agent,
        };
        Ok((live, description, timings))
    }

    /// A sandbox's state and make-up; a stopped one's record (with its `StopReason`) is kept
    /// until [`Self::remove_sandbox`] or the manager's `stopped_retention`.
    pub async fn get(&self, id: &SandboxId) -> Result<SandboxInfo> {
        self.prune_stopped();
        Ok(self.slot(id)?.info())
    }

    /// Every sandbox, stopped ones included, in creation order.
    pub async fn list(&self) -> Vec<SandboxInfo> {
        self.prune_stopped();
        let mut slots: Vec<Arc<Slot>> = self.registry().values().cloned().collect();
        slots.sort_by_key(|s| s.seq);
        slots.iter().map(|s| s.info()).collect()
    }

    /// Stops the sandbox's VM, frees it and deletes its private disk copies; its record stays
    /// as `Stopped { reason: Killed }` (or the reason it had already stopped for), with its
    /// console log, until [`Self::remove_sandbox`] or the retention drops it. Killing a stopped
    /// sandbox cleans up what is left and succeeds. A hibernation directory (the caller's) is
    /// left alone.
    pub async fn kill(&self, id: &SandboxId) -> Result<()> {
        let slot = self.slot(id)?;
        detached("kill", async move {
            shut_down(&slot).await;
            tracing::info!("sandbox {} killed", slot.id);
            Ok(())
        })
        .await?;
        self.prune_stopped();
        Ok(())
    }

    /// Kills the sandbox if it still runs, then forgets it: its record and its whole work
    /// directory (console log included) go. A console log at a `SandboxConfig::console_log`
    /// path of the caller's stays.
    pub async fn remove_sandbox(&self, id: &SandboxId) -> Result<()> {
        let slot = self
            .registry()
            .remove(id)
            .ok_or_else(|| SandboxError::UnknownSandbox(id.clone()))?;
        detached("remove_sandbox", async move {
            shut_down(&slot).await;
            clear_work_dir(slot.work_dir.clone(), false).await;
            Ok(())
        })
        .await
    }

    /// Drops the stopped records beyond the retention (oldest first), with their work
    /// directories (in the background).
    fn prune_stopped(&self) {
        let retention = self.inner.retention;
        let mut registry = self.registry();
        let stopped: Vec<(Instant, SandboxId)> = registry
            .values()
            .filter_map(|slot| {
                let Summary {
                    state, stopped_at, ..
                } = slot.summary();
                state.is_stopped().then_some(())?;
                Some((stopped_at?, slot.id.clone()))
            })
            .collect();
        for id in expired(stopped, retention, Instant::now()) {
            if let Some(slot) = registry.remove(&id) {
                tracing::debug!("sandbox {id}: stopped record dropped (retention)");
                tokio::spawn(async move {
                    shut_down(&slot).await;
                    clear_work_dir(slot.work_dir.clone(), false).await;
                });
            }
        }
    }

    /// Test builds only: makes `thread` of the sandbox's VM panic (see `vmm::fault`). In
    /// Process mode the fault goes over the sandbox process's API (`PUT /v1/fault`).
    #[cfg(feature = "fault-injection")]
    pub async fn inject_fault(
        &self,
        id: &SandboxId,
        thread: vmm::fault::FaultThread,
    ) -> Result<()> {
        self.inject_fault_with(id, thread, vmm::fault::FaultKind::Panic)
            .await
    }

    /// Test builds only: makes `thread` panic or make a forbidden system call (Process mode
    /// only: in-process a forbidden call would end the worker, so it is refused with
    /// `InvalidConfig`).
    #[cfg(feature = "fault-injection")]
    pub async fn inject_fault_with(
        &self,
        id: &SandboxId,
        thread: vmm::fault::FaultThread,
        kind: vmm::fault::FaultKind,
    ) -> Result<()> {
        let slot = self.slot(id)?;
        let phase = slot.phase.read().await;
        match &*phase {
            Phase::Running(Live {
                backend: Backend::InProcess { vm, .. },
                ..
            }) => {
                if kind == vmm::fault::FaultKind::Syscall {
                    return Err(SandboxError::InvalidConfig(
                        "a forbidden system call in-process would end the worker".into(),
                    ));
                }
                vm.controller()
                    .inject_fault(thread)
                    .map_err(|source| SandboxError::VmControl {
                        id: id.clone(),
                        operation: "inject_fault",
                        source,
                    })
            }
            Phase::Running(Live {
                backend: Backend::Process(process),
                ..
            }) => {
                let process = Arc::clone(process);
                blocking("inject_fault", move || process.inject_fault(thread, kind))
                    .await?
                    .map_err(|e| SandboxError::io("injecting a fault into", &slot.work_dir, e))
            }
            other => Err(slot.wrong_state(other, "inject_fault", "running")),
        }
    }

    /// Sets the balloon target of a running sandbox (MiB its guest should give back; at most
    /// its memory) and answers the balloon's state. `InvalidConfig` without a balloon device
    /// (`BootSpec::balloon`).
    pub async fn set_balloon(
        &self,
        id: &SandboxId,
        target_mib: u32,
    ) -> Result<crate::BalloonStatus> {
        let slot = self.slot(id)?;
        let phase = slot.phase.read().await;
        let control = |source| SandboxError::VmControl {
            id: id.clone(),
            operation: "set_balloon",
            source,
        };
        match &*phase {
            Phase::Running(Live {
                backend: Backend::InProcess { vm, .. },
                ..
            }) => {
                let controller = vm.controller();
                controller.set_balloon_target(target_mib).map_err(control)?;
                controller.balloon().ok_or_else(|| {
                    SandboxError::InvalidConfig("the sandbox has no balloon device".into())
                })
            }
            Phase::Running(Live {
                backend: Backend::Process(process),
                ..
            }) => {
                let api = process.api();
                let update = vmm_api::BalloonUpdate {
                    target_mib: Some(target_mib),
                    stats_interval_s: None,
                };
                let info = blocking("set_balloon", move || api.set_balloon(&update))
                    .await?
                    .map_err(|e| SandboxError::InvalidConfig(format!("set_balloon: {e}")))?;
                Ok(status_of(&info))
            }
            other => Err(slot.wrong_state(other, "set_balloon", "running")),
        }
    }

    /// Kills every sandbox (for a worker shutting down); their records stay, as [`Self::kill`].
    pub async fn kill_all(&self) {
        let ids: Vec<SandboxId> = self.registry().keys().cloned().collect();
        for id in ids {
            // A record the retention dropped meanwhile is fine.
            match self.kill(&id).await {
                Ok(()) | Err(SandboxError::UnknownSandbox(_)) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }

    /// Agent SyncFs, pause, snapshot to `dir` (missing or empty; or the directory this
    /// sandbox was last hibernated to and woken from, which is replaced), then stop the VM and
    /// free its memory. The sandbox stays listed as hibernated.
    pub async fn hibernate(
        &self,
        id: &SandboxId,
        dir: impl AsRef<Path>,
    ) -> Result<SnapshotOutcome> {
        self.hibernate_with(id, dir, SnapshotOptions::default())
            .await
    }

    /// [`Self::hibernate`]; with `options.replace` a snapshot already in `dir` is replaced.
    pub async fn hibernate_with(
        &self,
        id: &SandboxId,
        dir: impl AsRef<Path>,
        options: SnapshotOptions,
    ) -> Result<SnapshotOutcome> {
        let slot = self.slot(id)?;
        let dir = dir.as_ref().to_path_buf();
        detached("hibernate", async move {
            lifecycle::hibernate(&slot, &dir, options).await
        })
        .await
    }

    /// Hibernates the sandbox into a snapshot store (`file:///abs/store/NAME`,
    /// `s3://bucket/prefix/NAME`; S3 settings from the `AWS_*` variables): agent SyncFs, pause,
    /// snapshot with copies of its writable disks (a checkpoint), stop, push. Once the push is
    /// complete the local copy and the sandbox's record go: it lives in the store, and
    /// `create(SandboxConfig::from_store(url))` wakes it here or on any host (same guest,
    /// processes and files; new vsock CID and disk copies). If the push fails the sandbox
    /// stays hibernated in the local checkpoint the error names (nothing is lost).
    pub async fn hibernate_to(&self, id: &SandboxId, url: &str) -> Result<HibernatedToStore> {
        snapshot_store::SnapshotUrl::parse(url)?;
        let slot = self.slot(id)?;
        let staging = self.inner.work_dir.join(format!(".hibernate-{id}"));
        let dir = staging.clone();
        let snapshot = detached("hibernate", async move {
            lifecycle::hibernate_checkpoint(&slot, &dir).await
        })
        .await?;
        let (dir, url_owned) = (staging.clone(), url.to_string());
        let pushed = detached("push", async move {
            store_wake::push_checkpoint(&dir, &url_owned).await
        })
        .await
        .map_err(|e| SandboxError::StorePush {
            id: id.clone(),
            kept: staging.clone(),
            reason: e.to_string(),
        })?;
        self.remove_sandbox(id).await?;
        if let Err(e) = std::fs::remove_dir_all(&staging) {
            tracing::warn!("cannot remove {}: {e}", staging.display());
        }
        tracing::info!(
            "sandbox {id} hibernated to {url}: {} of {} chunks uploaded ({} bytes)",
            pushed.uploaded_chunks,
            pushed.chunks,
            pushed.uploaded_bytes
        );
        Ok(HibernatedToStore { snapshot, pushed })
    }

    /// Wakes a sandbox hibernated with [`Self::hibernate_to`] (on this host or another) from
    /// `url`: `create(SandboxConfig::from_store(url))` with the default agent timeout. Returns
    /// its new id.
    pub async fn wake_from(&self, url: &str) -> Result<SandboxId> {
        self.create(SandboxConfig::from_store(url)).await
    }

    /// Restores a hibernated sandbox from `dir`, waits for its agent and sets the guest's wall
    /// clock to the host's.
    pub async fn wake(&self, id: &SandboxId, dir: impl AsRef<Path>) -> Result<StartTimings> {
        let slot = self.slot(id)?;
        let dir = dir.as_ref().to_path_buf();
        let pool = self.inner.warm.clone();
        detached(
            "wake",
            async move { lifecycle::wake(&slot, &dir, &pool).await },
        )
        .await
    }

    /// Keeps `count` pre-built VM shells of `shape` ready (0 frees them): an in-process wake,
    /// or a start from a template or fork, whose snapshot has this shape then takes one and
    /// only maps the snapshot's memory and loads its state; a taken shell is rebuilt in the
    /// background. Each shell costs its KVM VM, vCPUs and parked vCPU threads, not its RAM
    /// (reserved, untouched). `Isolation::Process` starts a process per sandbox, which a shell
    /// in this process cannot serve: refused.
    pub async fn keep_warm(&self, shape: ShellShape, count: usize) -> Result<()> {
        if self.inner.process.is_some() {
            return Err(SandboxError::InvalidConfig(
                "a warm pool serves in-process sandboxes only (Isolation::InProcess)".into(),
            ));
        }
        let pool = self.inner.warm.clone();
        blocking("keep_warm", move || pool.keep(shape, count)).await
    }

    /// The shape of VM shell a wake from, or a start from the template, `snapshot_dir` takes
    /// (its vCPUs, memory and PIT, with this manager's restore settings).
    pub fn shell_shape(&self, snapshot_dir: impl AsRef<Path>) -> Result<ShellShape> {
        let mut options = vmm::RestoreOptions::new(snapshot_dir.as_ref());
        options.seccomp = self.inner.seccomp;
        // As every sandbox restore (start::plan_template, start::wake).
        options.dirty_log = false;
        ShellShape::for_snapshot(&options).map_err(|source| {
            SandboxError::InvalidConfig(format!(
                "{}: reading the snapshot's shape: {source}",
                snapshot_dir.as_ref().display()
            ))
        })
    }

    /// The warm pool's shells and counters.
    pub fn warm_pool(&self) -> WarmPoolStats {
        self.inner.warm.stats()
    }

    /// Snapshots a running sandbox to `dir` (missing or empty) with copies of its writable
    /// disks taken at the same instant; the sandbox keeps running. `fork` and
    /// `SandboxConfig::template` start new sandboxes from it.
    pub async fn checkpoint(
        &self,
        id: &SandboxId,
        dir: impl AsRef<Path>,
    ) -> Result<SnapshotOutcome> {
        self.checkpoint_with(id, dir, SnapshotOptions::default())
            .await
    }

    /// [`Self::checkpoint`]; with `options.replace` a checkpoint already in `dir` (snapshot,
    /// disk copies, `sandbox.json`, nothing else) is replaced.
    pub async fn checkpoint_with(
        &self,
        id: &SandboxId,
        dir: impl AsRef<Path>,
        options: SnapshotOptions,
    ) -> Result<SnapshotOutcome> {
        let slot = self.slot(id)?;
        let dir = dir.as_ref().to_path_buf();
        detached("checkpoint", async move {
            lifecycle::checkpoint(&slot, &dir, options).await
        })
        .await
    }

    /// A handle to the sandbox's VM for the async VM operations (`pause_async`, `info_async`,
    /// …). Holding it keeps the VM's memory alive after a hibernate or kill: drop it soon.
    /// `Isolation::InProcess` only: with `Isolation::Process` the VM is in another process
    /// (`SandboxError::NotInProcess`).
    pub async fn vm_controller(&self, id: &SandboxId) -> Result<VmController> {
        let slot = self.slot(id)?;
        let phase = slot.phase.read().await;
        match &*phase {
            Phase::Running(Live {
                backend: Backend::InProcess { vm, .. },
                ..
            }) => Ok(vm.controller()),
            Phase::Running(_) => Err(SandboxError::NotInProcess {
                id: id.clone(),
                operation: "vm_controller",
            }),
            other => Err(slot.wrong_state(other, "vm_controller", "running")),
        }
    }
}

/// The stopped records to drop: older than `max_age`, and the oldest beyond `max_records`.
fn expired(
    mut stopped: Vec<(Instant, SandboxId)>,
    retention: StoppedRetention,
    now: Instant,
) -> Vec<SandboxId> {
    stopped.sort();
    let excess = stopped.len().saturating_sub(retention.max_records);
    stopped
        .into_iter()
        .enumerate()
        .filter(|(i, (at, _))| *i < excess || now.duration_since(*at) > retention.max_age)
        .map(|(_, (_, id))| id)
        .collect()
}

/// Stops what still runs of `slot` and frees what it holds (its VM or process, its uid); marks
/// it `Killed` unless it had already stopped. Its console log stays.
async fn shut_down(slot: &Slot) {
    let mut phase = slot.phase.write().await;
    let previous = std::mem::replace(&mut *phase, Phase::Gone);
    if let Phase::Running(live) = previous {
        // A VM that ended on its own keeps its reason.
        if let Some(ended) = live.backend.ended() {
            slot.mark_stopped(slot.stop_reason(ended));
        }
        drop(live.agent);
        let grace = slot
            .process
            .as_ref()
            .map_or(Duration::ZERO, |p| p.stop_grace());
        lifecycle::stop(live.backend, grace).await;
    }
    slot.mark_stopped(StopReason::Killed);
    clear_work_dir(slot.work_dir.clone(), true).await;
    if let Some(context) = &slot.process {
        context.release(&slot.id);
    }
}

/// Deletes the sandbox's work directory, or (`keep_console`) everything in it but a non-empty
/// console log and its rotated predecessor.
async fn clear_work_dir(dir: PathBuf, keep_console: bool) {
    let shown = dir.clone();
    let removed = blocking("removing the sandbox directory", move || {
        if !keep_console {
            return match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let entries = match std::fs::read_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        let rotated = format!("{CONSOLE_LOG_FILE}.1");
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let console = name == CONSOLE_LOG_FILE || name == rotated.as_str();
            // An empty console explains nothing.
            if console && entry.metadata().is_ok_and(|m| m.len() > 0) {
                continue;
            }
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        // Nothing kept: no empty directory either.
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    })
    .await;
    if let Ok(Err(e)) = removed {
        tracing::warn!("removing {}: {e}", shown.display());
    }
}

/// The balloon's state as a sandbox process's API reports it (counters and the figures the
/// API carries; statistics by tag are not part of that answer).
fn status_of(info: &vmm_api::BalloonInfo) -> crate::BalloonStatus {
    crate::BalloonStatus {
        config: crate::BalloonConfig {
            target_mib: info.target_mib,
            deflate_on_oom: info.deflate_on_oom,
            stats_interval_s: info.stats_interval_s,
            free_page_reporting: info.free_page_reporting,
        },
        target_pages: info
            .target_mib
            .saturating_mul(devices::virtio::balloon::PAGES_PER_MIB as u32),
        actual_pages: info.actual_pages,
        active: true,
        stats: Vec::new(),
        stats_age: None,
        counters: devices::virtio::balloon::BalloonCounters {
            inflated_pages: info.inflated_pages,
            deflated_pages: info.deflated_pages,
            reported_pages: info.reported_pages,
            released_bytes: info.released_bytes,
            rejected: info.rejected,
            release_errors: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}

    #[test]
    fn manager_is_shareable() {
        assert_send_sync::<SandboxManager>();
    }

    #[tokio::test]
    async fn unknown_ids_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let manager = SandboxManager::new(
            ManagerConfig::new(dir.path().join("work")).with_isolation(Isolation::InProcess),
        )
        .unwrap();
        let id = SandboxId::from("sb-404");
        assert!(manager.list().await.is_empty());
        for err in [
            manager.get(&id).await.err(),
            manager.kill(&id).await.err(),
            manager.hibernate(&id, dir.path().join("h")).await.err(),
            manager.wake(&id, dir.path().join("h")).await.err(),
            manager.checkpoint(&id, dir.path().join("c")).await.err(),
            manager.vm_controller(&id).await.err(),
            manager
                .exec(&id, &super::super::ExecCommand::new("true"))
                .await
                .err(),
            manager.read_file(&id, "/etc/hostname").await.err(),
        ] {
            assert!(
                matches!(&err, Some(SandboxError::UnknownSandbox(i)) if *i == id),
                "{err:?}"
            );
        }
        assert!(format!("{:?}", manager.get(&id).await.err()).contains("sb-404"));
    }

    #[test]
    fn retention_drops_the_oldest_and_the_expired() {
        let now = Instant::now();
        let at =
            |secs_ago: u64, id: &str| (now - Duration::from_secs(secs_ago), SandboxId::from(id));
        let retention = StoppedRetention {
            max_records: 2,
            max_age: Duration::from_secs(60),
        };
        let stopped = vec![at(10, "sb-3"), at(30, "sb-1"), at(20, "sb-2")];
        assert_eq!(expired(stopped, retention, now), [SandboxId::from("sb-1")]);
        let stale = vec![at(61, "sb-1"), at(5, "sb-2")];
        assert_eq!(expired(stale, retention, now), [SandboxId::from("sb-1")]);
        assert!(expired(vec![at(1, "sb-1")], retention, now).is_empty());
    }

    /// A record as `create` leaves it, already stopped (no VM needed).
    fn stopped_slot(manager: &SandboxManager, id: &str, reason: StopReason) -> Arc<Slot> {
        let id = SandboxId::from(id);
        let work_dir = manager.inner.work_dir.join(id.as_str());
        std::fs::create_dir_all(&work_dir).unwrap();
        std::fs::write(work_dir.join(CONSOLE_LOG_FILE), "booting\n").unwrap();
        std::fs::write(work_dir.join("disk-0.img"), "disk").unwrap();
        let slot = Arc::new(Slot {
            id: id.clone(),
            seq: manager.inner.seq.fetch_add(1, Ordering::Relaxed),
            work_dir,
            console_log: None,
            agent_timeout: Duration::from_secs(1),
            agent_client: Default::default(),
            seccomp: SeccompLevel::default(),
            process: None,
            description: Description {
                origin: SandboxOrigin::Boot {
                    kernel: "/vmlinux".into(),
                },
                vcpus: 1,
                mem_mib: 128,
                vsock_cid: 3,
                disks: Vec::new(),
                network: Vec::new(),
            },
            summary: Mutex::new(Summary {
                state: SandboxState::Running,
                timings: StartTimings::default(),
                stopped_at: None,
            }),
            phase: tokio::sync::RwLock::new(Phase::Gone),
            own_hibernation: Mutex::new(None),
            wake_ahead: Mutex::default(),
        });
        slot.mark_stopped(reason);
        manager.registry().insert(id, Arc::clone(&slot));
        slot
    }

    #[tokio::test]
    async fn stopped_records_stay_until_removed_or_retention() {
        let dir = tempfile::tempdir().unwrap();
        let mut config =
            ManagerConfig::new(dir.path().join("work")).with_isolation(Isolation::InProcess);
        config.stopped_retention.max_records = 2;
        let manager = SandboxManager::new(config).unwrap();
        let first = stopped_slot(&manager, "sb-1", StopReason::GuestPowerOff);
        // Killing a stopped sandbox keeps its first reason, its record and its console log.
        manager.kill(&first.id).await.unwrap();
        let info = manager.get(&first.id).await.unwrap();
        assert_eq!(
            info.state,
            SandboxState::Stopped {
                reason: StopReason::GuestPowerOff
            }
        );
        assert!(first.work_dir.join(CONSOLE_LOG_FILE).exists());
        assert!(!first.work_dir.join("disk-0.img").exists());

        // Two more stopped records: the oldest goes (with its directory), the rest stay.
        stopped_slot(&manager, "sb-2", StopReason::Killed);
        let third = stopped_slot(
            &manager,
            "sb-3",
            StopReason::VmmFailed { reason: "x".into() },
        );
        let listed: Vec<String> = manager
            .list()
            .await
            .into_iter()
            .map(|i| i.id.to_string())
            .collect();
        assert_eq!(listed, ["sb-2", "sb-3"]);
        assert!(matches!(
            manager.get(&first.id).await,
            Err(SandboxError::UnknownSandbox(_))
        ));

        manager.remove_sandbox(&third.id).await.unwrap();
        assert!(!third.work_dir.exists());
        assert_eq!(manager.list().await.len(), 1);
        assert!(matches!(
            manager.remove_sandbox(&third.id).await,
            Err(SandboxError::UnknownSandbox(_))
        ));
        // The dropped record's directory goes in the background.
        for _ in 0..100 {
            if !first.work_dir.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!first.work_dir.exists());
    }

    #[tokio::test]
    async fn a_missing_template_fails_cleanly_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let manager =
            SandboxManager::new(ManagerConfig::new(&work).with_isolation(Isolation::InProcess))
                .unwrap();
        let err = manager
            .fork(dir.path().join("no-such-checkpoint"), ForkConfig::default())
            .await
            .unwrap_err();
        assert!(matches!(err, SandboxError::BadCheckpoint { .. }), "{err}");
        assert!(manager.list().await.is_empty());
        assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
    }
}
