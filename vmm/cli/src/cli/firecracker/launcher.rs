//! The main thread builds the VMs the API asks for: API threads send a [`Job`] and wait for
//! the answer.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use anyhow::bail;
use vmm::seccomp::ThreadKind;
use vmm::vm::RESTORED_MARKER;
use vmm::{RestoreOptions, SeccompLevel, Vm, VmConfig, VmController};
use vmm_fc_api::{FcVmm, Launcher};

type Reply = Sender<Result<VmController, String>>;

pub enum Job {
    Start(Box<VmConfig>, Reply),
    Restore(Box<RestoreOptions>, Reply),
    /// End the process before any VM runs (a signal, or a `--config-file` VM that failed).
    Abort(String),
}

#[derive(Clone)]
pub struct ChannelLauncher {
    jobs: Arc<Mutex<Sender<Job>>>,
}

impl ChannelLauncher {
    pub fn new() -> (Self, Receiver<Job>) {
        let (tx, rx) = channel();
        (
            ChannelLauncher {
                jobs: Arc::new(Mutex::new(tx)),
            },
            rx,
        )
    }

    fn send(&self, job: Job) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.send(job).is_ok()
    }

    fn ask(&self, job: impl FnOnce(Reply) -> Job) -> Result<VmController, String> {
        let (reply, answer) = channel();
        if !self.send(job(reply)) {
            return Err("the VMM is shutting down".into());
        }
        answer
            .recv()
            .map_err(|_| "the VMM is shutting down".to_string())?
    }
}

impl Launcher for ChannelLauncher {
    fn start(&self, config: VmConfig) -> Result<VmController, String> {
        self.ask(|reply| Job::Start(Box::new(config), reply))
    }

    fn restore(&self, options: RestoreOptions) -> Result<VmController, String> {
        self.ask(|reply| Job::Restore(Box::new(options), reply))
    }
}

/// Builds VMs until one runs (a failed start or load is answered and the VMM waits for the
/// next request, as Firecracker does) and returns it.
pub fn serve_jobs(jobs: &Receiver<Job>) -> anyhow::Result<Vm> {
    loop {
        let Ok(job) = jobs.recv() else {
            bail!("the API stopped before a VM was started");
        };
        let (built, reply) = match job {
            Job::Start(config, reply) => (Vm::start(*config).map_err(|e| format!("{e:#}")), reply),
            Job::Restore(options, reply) => {
                let started = std::time::Instant::now();
                let vm = Vm::restore(*options).map_err(|e| format!("{e:#}"));
                if vm.is_ok() {
                    tracing::info!(
                        "{RESTORED_MARKER} in {:.3} ms",
                        started.elapsed().as_secs_f64() * 1e3
                    );
                }
                (vm, reply)
            }
            Job::Abort(reason) => bail!("{reason}"),
        };
        match built {
            Ok(vm) => {
                // The requester may have gone (its connection timed out): the VM runs anyway.
                let _ = reply.send(Ok(vm.controller()));
                return Ok(vm);
            }
            Err(e) => {
                tracing::warn!("cannot build the VM: {e}");
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// `--config-file`: `InstanceStart` at once, from a helper thread (this thread builds it).
pub fn start_in_background(front: Arc<FcVmm>, launcher: ChannelLauncher, level: SeccompLevel) {
    let spawned = std::thread::Builder::new()
        .name("fc-start".into())
        .spawn(move || {
            // It does what an API connection thread does for `InstanceStart`, under its filter.
            if let Err(e) = vmm::seccomp::install(ThreadKind::Api, level) {
                launcher.send(Job::Abort(format!("fc-start thread: {e}")));
                return;
            }
            if let Err(e) = front.start() {
                launcher.send(Job::Abort(format!("--config-file: {e}")));
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the VM's start thread: {e}");
    }
}

/// SIGINT, SIGTERM and SIGHUP stop the VM cleanly, or end the process before one runs.
pub fn spawn_signal_thread(
    set: libc::sigset_t,
    front: Arc<FcVmm>,
    launcher: ChannelLauncher,
    level: SeccompLevel,
) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Err(e) = vmm::seccomp::install(ThreadKind::Signals, level) {
                tracing::error!("signal thread: {e}");
                return;
            }
            let mut sig = 0;
            // SAFETY: `set` is a valid signal set; sigwait writes the signal number to `sig`.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            tracing::info!("signal {sig}: stopping");
            match front.controller() {
                Some(vm) => vm.shutdown(),
                None => {
                    launcher.send(Job::Abort(format!("stopped by signal {sig}")));
                }
            }
        });
}
