//! One sandbox process: started from a long-lived spawner thread (so `PR_SET_PDEATHSIG`, which
//! follows the thread that forked, fires only when the worker itself dies), in its own process
//! group, watched through a pidfd by a small task (no thread per sandbox), stopped politely
//! over its API and then with SIGKILL.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::access::Grants;
use super::exit_reason;
use super::paths::ProcessPaths;
use crate::console_log::ConsoleLog;
use vmm_api::client::ApiClient;

/// How a sandbox process ended.
#[derive(Debug, Clone)]
pub(crate) struct ExitInfo {
    pub status: ExitStatus,
    /// One line: status or signal, and the process's telling stderr line.
    pub reason: String,
}

/// What to start.
pub(crate) struct Spawn {
    pub binary: PathBuf,
    pub args: Vec<OsString>,
    /// Guest console (the process's stdout, through a pipe the manager reads into the bounded
    /// log); `None`: discarded.
    pub console_log: Option<ConsoleLog>,
    pub paths: ProcessPaths,
    /// Jailed: the sandbox's uid (= gid).
    pub uid: Option<u32>,
    /// Jailed: the ACL entries that let it open its inputs, revoked once it has ended.
    pub grants: Option<std::sync::Arc<Mutex<Grants>>>,
}

pub(crate) struct SandboxProcess {
    pid: u32,
    pidfd: OwnedFd,
    child: Mutex<Option<Child>>,
    paths: ProcessPaths,
    /// Set before the manager ends the process on purpose (kill, hibernate): its exit is then
    /// no failure.
    expected: AtomicBool,
    exit: watch::Receiver<Option<ExitInfo>>,
    exit_tx: Mutex<Option<watch::Sender<Option<ExitInfo>>>>,
    staging_seq: AtomicU64,
    uid: Option<u32>,
    grants: Option<std::sync::Arc<Mutex<Grants>>>,
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// The spawner thread's queue. The thread lives as long as the process.
fn spawner() -> io::Result<&'static Mutex<mpsc::Sender<SpawnRequest>>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    if let Some(s) = SPAWNER.get() {
        return Ok(s);
    }
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("sandbox-spawner".into())
        .spawn(move || {
            for (mut command, reply) in rx {
                let _ = reply.send(command.spawn());
            }
        })?;
    Ok(SPAWNER.get_or_init(|| Mutex::new(tx)))
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: `fd` is a new descriptor this process owns and nothing else closes.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl SandboxProcess {
    /// Starts the process (blocking: run it on the blocking pool) and the task that watches it
    /// (needs a tokio runtime).
    pub fn spawn(
        spawn: Spawn,
        runtime: &tokio::runtime::Handle,
    ) -> io::Result<std::sync::Arc<Self>> {
        // Fail before starting anything when the log cannot be opened.
        if let Some(log) = &spawn.console_log {
            drop(log.open()?);
        }
        let stdout = match &spawn.console_log {
            Some(_) => Stdio::piped(),
            None => Stdio::null(),
        };
        let stderr = File::create(spawn.paths.stderr())?;
        let mut command = Command::new(&spawn.binary);
        command
            .args(&spawn.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::from(stderr))
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec and calls only prctl,
        // which is async-signal-safe; it allocates nothing and touches no lock.
        unsafe {
            command.pre_exec(|| {
                // The sandbox dies with the worker (the spawner thread lives as long as it).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (reply_tx, reply_rx) = mpsc::channel();
        spawner()?
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((command, reply_tx))
            .map_err(|_| io::Error::other("the sandbox spawner thread is gone"))?;
        let mut child = reply_rx
            .recv()
            .map_err(|_| io::Error::other("the sandbox spawner thread is gone"))??;
        let pid = child.id();
        if let (Some(log), Some(stdout)) = (&spawn.console_log, child.stdout.take()) {
            let _context = runtime.enter();
            // On failure the read end is dropped: the console's writes fail, nothing blocks.
            if let Err(e) = log.spawn_pump(OwnedFd::from(stdout)) {
                tracing::warn!("sandbox process {pid}: console pipe: {e}");
            }
        }
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let (tx, rx) = watch::channel(None);
        let process = std::sync::Arc::new(Self {
            pid,
            pidfd,
            child: Mutex::new(Some(child)),
            paths: spawn.paths,
            expected: AtomicBool::new(false),
            exit: rx,
            exit_tx: Mutex::new(Some(tx)),
            staging_seq: AtomicU64::new(0),
            uid: spawn.uid,
            grants: spawn.grants,
        });
        let watched = std::sync::Arc::downgrade(&process);
        let fd = process.pidfd.try_clone()?;
        runtime.spawn(async move {
            // Readable once the process has ended.
            // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and the same
            // descriptor for the AsyncFd's whole life, and OwnedFd::as_raw_fd never changes.
            let registered =
                unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
            if let Ok(async_fd) = registered {
                let _ = async_fd.readable().await;
            }
            if let Some(process) = watched.upgrade() {
                let _ = tokio::task::spawn_blocking(move || process.reap()).await;
            }
        });
        tracing::debug!("sandbox process {pid} started");
        Ok(process)
    }

    /// Waits for the process (blocking) and publishes how it ended. Idempotent.
    fn reap(&self) {
        let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        // What the leader leaves behind in its group (a jail's VMM child) goes with it. The
        // leader is not reaped yet, so its pid still names this group and nothing else.
        if let Ok(pgid) = libc::pid_t::try_from(self.pid) {
            // SAFETY: kill(2) on the process group this manager created for the child.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let status = match child.wait() {
            Ok(status) => status,
            Err(e) => {
                tracing::warn!("waiting for sandbox process {}: {e}", self.pid);
                return;
            }
        };
        if let Some(grants) = &self.grants {
            grants.lock().unwrap_or_else(|e| e.into_inner()).revoke();
        }
        let reason = exit_reason::describe(status, &exit_reason::read_tail(&self.paths.stderr()));
        if let Some(tx) = self
            .exit_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = tx.send(Some(ExitInfo { status, reason }));
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The jailed process's uid (= gid).
    pub fn uid(&self) -> Option<u32> {
        self.uid
    }

    /// Who files moved out of the jail should belong to: this worker.
    pub fn jail_owner(&self) -> Option<(u32, u32)> {
        // SAFETY: geteuid/getegid take no arguments and cannot fail.
        self.uid
            .map(|_| unsafe { (libc::geteuid(), libc::getegid()) })
    }

    pub fn paths(&self) -> &ProcessPaths {
        &self.paths
    }

    pub fn api(&self) -> ApiClient {
        ApiClient::new(self.paths.api_host())
    }

    pub fn next_staging(&self) -> u64 {
        self.staging_seq.fetch_add(1, Ordering::Relaxed)
    }

    pub fn exit_expected(&self) -> bool {
        self.expected.load(Ordering::SeqCst)
    }

    /// How it ended, if it has.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    /// A receiver of how the process ended (`None` until it has).
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit.clone()
    }

    /// Waits until the process has ended.
    pub async fn exited(&self) -> Option<ExitInfo> {
        let mut rx = self.exit.clone();
        let waited = rx.wait_for(Option::is_some).await.map(|info| info.clone());
        match waited {
            Ok(info) => info,
            // The watching task's runtime is gone: reap here.
            Err(_) => {
                self.reap();
                self.exit_info()
            }
        }
    }

    fn sigkill(&self) {
        // SAFETY: pidfd_send_signal on our own pidfd (no pid reuse race); no memory passed.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
        // The rest of its group (a jail's helpers), while the leader is not reaped yet.
        if self.exit_info().is_none() {
            if let Ok(pgid) = libc::pid_t::try_from(self.pid) {
                // SAFETY: kill(2) on the process group this manager created for the child.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
        }
    }

    /// Ends the process on purpose: the API's shutdown, then SIGKILL after `grace`; waits.
    pub async fn stop(self: &std::sync::Arc<Self>, grace: Duration) -> Option<ExitInfo> {
        self.expected.store(true, Ordering::SeqCst);
        if self.exit_info().is_none() {
            let api = self.api().with_timeout(grace);
            let _ = tokio::task::spawn_blocking(move || api.shutdown()).await;
            if let Ok(info) = tokio::time::timeout(grace, self.exited()).await {
                return info;
            }
            tracing::warn!(
                "sandbox process {} did not stop within {grace:?}: SIGKILL",
                self.pid
            );
        }
        self.kill_now().await
    }

    /// SIGKILL and wait (a start that failed, or a process that would not stop).
    pub async fn kill_now(&self) -> Option<ExitInfo> {
        self.expected.store(true, Ordering::SeqCst);
        if self.exit_info().is_none() {
            self.sigkill();
        }
        self.exited().await
    }
}

impl Drop for SandboxProcess {
    fn drop(&mut self) {
        // Never leave a sandbox process behind a dropped handle.
        if self.exit_info().is_none() {
            self.sigkill();
            if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = child.wait();
            }
            if let Some(grants) = &self.grants {
                grants.lock().unwrap_or_else(|e| e.into_inner()).revoke();
            }
        }
    }
}
