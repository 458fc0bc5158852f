//! Drives a spawned process: forwards its output as ordered events, enforces
//! the timeout, and kills its process group when nobody listens any more.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};

use super::process::{exit_status, SpawnedProcess};
use super::reaper::WaitStatus;
use crate::proto::ExitStatus;

/// Bytes read from a pipe at once (and the largest output event).
const CHUNK: usize = 64 * 1024;
/// After the process exits, output still buffered in the pipes is drained;
/// descendants that keep a pipe open are given this long before the exit is
/// reported anyway.
const DRAIN_GRACE: Duration = Duration::from_millis(250);
/// Output events buffered ahead of the consumer (flow control: beyond this
/// the child blocks on write).
const EVENT_QUEUE: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Always the last event.
    Exit(ExitStatus),
}

/// Processes spawned by the agent that have not exited yet (pids, which are
/// also their process-group ids).
#[derive(Debug, Clone, Default)]
pub struct ProcessTable {
    running: Arc<Mutex<HashSet<u32>>>,
}

impl ProcessTable {
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Sends `signal` to every running process group (SIGTERM forwarding).
    pub fn signal_all(&self, signal: i32) {
        for pid in self.lock().iter() {
            // Failure (already gone) is fine: we are broadcasting.
            let _ = signal_group(*pid, signal);
        }
    }

    fn insert(&self, pid: u32) -> TableEntry {
        self.lock().insert(pid);
        TableEntry {
            table: self.clone(),
            pid,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u32>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct TableEntry {
    table: ProcessTable,
    pid: u32,
}

impl Drop for TableEntry {
    fn drop(&mut self) {
        self.table.lock().remove(&self.pid);
    }
}

/// Sends `signal` to the process group `pgid`.
pub fn signal_group(pgid: u32, signal: i32) -> std::io::Result<()> {
    let pgid = libc::pid_t::try_from(pgid)
        .ok()
        .filter(|pgid| *pgid > 1)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: kill has no memory effects; a negative pid names a group.
    if unsafe { libc::kill(-pgid, signal) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Handle to signal a driven process while it runs.
#[derive(Debug, Clone)]
pub struct ProcessControl {
    pid: u32,
    exited: watch::Receiver<bool>,
}

impl ProcessControl {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Signals the process group, unless the leader has already exited (its
    /// pid may then be reused).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        if *self.exited.borrow() {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        signal_group(self.pid, signal)
    }

    /// Resolves once the process has exited.
    pub async fn exited(&mut self) {
        // An error means the driver is gone, which also means "exited".
        let _ = self.exited.wait_for(|exited| *exited).await;
    }
}

/// A process being driven: write `stdin`, read `events`.
pub struct DrivenProcess {
    pub control: ProcessControl,
    pub stdin: pipe::Sender,
    pub events: mpsc::Receiver<ProcessEvent>,
}

/// Starts the driver task for `process`.
pub fn drive(
    process: SpawnedProcess,
    timeout: Option<Duration>,
    table: &ProcessTable,
) -> DrivenProcess {
    let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
    let (exited_tx, exited) = watch::channel(false);
    let entry = table.insert(process.pid);
    let driver = Driver {
        pid: process.pid,
        stdout: Some(process.stdout),
        stderr: Some(process.stderr),
        events: events_tx,
        exited: exited_tx,
        deadline: timeout.map(|timeout| Instant::now() + timeout),
        _entry: entry,
    };
    tokio::spawn(driver.run(process.exit));
    DrivenProcess {
        control: ProcessControl {
            pid: process.pid,
            exited,
        },
        stdin: process.stdin,
        events,
    }
}

struct Driver {
    pid: u32,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    events: mpsc::Sender<ProcessEvent>,
    exited: watch::Sender<bool>,
    deadline: Option<Instant>,
    _entry: TableEntry,
}

impl Driver {
    async fn run(mut self, mut exit: oneshot::Receiver<WaitStatus>) {
        let mut pending: Option<ProcessEvent> = None;
        let mut status: Option<WaitStatus> = None;
        let mut exit_lost = false;
        let mut timed_out = false;
        let mut drain_deadline: Option<Instant> = None;

        loop {
            let exited = status.is_some() || exit_lost;
            if exited && pending.is_none() && self.stdout.is_none() && self.stderr.is_none() {
                break;
            }
            tokio::select! {
                biased;
                _ = self.events.closed() => {
                    if !exited {
                        tracing::debug!(pid = self.pid, "consumer gone, killing process group");
                        let _ = signal_group(self.pid, libc::SIGKILL);
                    }
                    return;
                }
                result = &mut exit, if !exited => {
                    match result {
                        Ok(raw) => status = Some(raw),
                        Err(_) => exit_lost = true,
                    }
                    let _ = self.exited.send(true);
                    drain_deadline = Some(Instant::now() + DRAIN_GRACE);
                }
                _ = sleep_until_opt(self.deadline), if !exited && !timed_out => {
                    tracing::debug!(pid = self.pid, "timeout, killing process group");
                    let _ = signal_group(self.pid, libc::SIGKILL);
                    timed_out = true;
                }
                permit = self.events.reserve(), if pending.is_some() => {
                    match (permit, pending.take()) {
                        (Ok(permit), Some(event)) => permit.send(event),
                        _ => return,
                    }
                }
                chunk = read_chunk(&mut self.stdout), if pending.is_none() && self.stdout.is_some() => {
                    match chunk {
                        Some(data) => pending = Some(ProcessEvent::Stdout(data)),
                        None => self.stdout = None,
                    }
                }
                chunk = read_chunk(&mut self.stderr), if pending.is_none() && self.stderr.is_some() => {
                    match chunk {
                        Some(data) => pending = Some(ProcessEvent::Stderr(data)),
                        None => self.stderr = None,
                    }
                }
                _ = sleep_until_opt(drain_deadline), if pending.is_none() => {
                    // Descendants still hold the pipes: stop waiting for EOF.
                    self.stdout = None;
                    self.stderr = None;
                }
            }
        }

        let final_status = match status {
            Some(raw) => exit_status(raw, timed_out),
            None => ExitStatus {
                outcome: None,
                timed_out,
            },
        };
        // The consumer may be gone; then nobody needs the status.
        let _ = self.events.send(ProcessEvent::Exit(final_status)).await;
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Reads the next chunk; `None` at EOF or on error (both end the stream).
async fn read_chunk(pipe: &mut Option<pipe::Receiver>) -> Option<Vec<u8>> {
    let pipe = pipe.as_mut()?;
    let mut buffer = Vec::with_capacity(CHUNK);
    match pipe.read_buf(&mut buffer).await {
        Ok(0) => None,
        Ok(_) => Some(buffer),
        Err(err) => {
            tracing::debug!(%err, "pipe read failed");
            None
        }
    }
}
