//! One detached session: its process's control, stdin, buffered output and exit status. A
//! collector task moves the process's output into the ring whether or not anyone is attached,
//! so the process never blocks on an absent reader and lives until it exits (or is killed).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};

use super::registry::Entry;
use super::ring::{Chunk, OutputRing, Stream};
use crate::proto::ExitStatus;
use crate::server::driver::{ProcessControl, ProcessEvent};

pub struct Session {
    pub id: String,
    /// For listings (already cut to its bound).
    pub command: String,
    pub started: SystemTime,
    pub control: ProcessControl,
    /// `None` once closed. Behind an async lock: a write may wait for the process to read.
    pub stdin: Arc<tokio::sync::Mutex<Option<pipe::Sender>>>,
    state: Mutex<State>,
    /// Bumped whenever output or the exit status arrives.
    changed: watch::Sender<u64>,
}

struct State {
    ring: OutputRing,
    exit: Option<(ExitStatus, Instant)>,
}

/// What an attacher reads in one go.
pub struct Batch {
    pub chunks: Vec<Chunk>,
    /// Sequence number to read from next time.
    pub next: u64,
    /// Set when `chunks` holds everything up to the exit.
    pub exit: Option<ExitStatus>,
}

impl Session {
    pub fn new(
        id: String,
        command: String,
        control: ProcessControl,
        stdin: pipe::Sender,
        ring_bytes: usize,
    ) -> Self {
        Self {
            id,
            command,
            started: SystemTime::now(),
            control,
            stdin: Arc::new(tokio::sync::Mutex::new(Some(stdin))),
            state: Mutex::new(State {
                ring: OutputRing::new(ring_bytes),
                exit: None,
            }),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed
            .send_modify(|version| *version = version.wrapping_add(1));
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.lock().exit.as_ref().map(|(status, _)| *status)
    }

    /// A receiver that sees every later change (mark it seen before reading).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Up to `max` chunks from sequence number `from`, and the exit status once nothing is left.
    pub fn read(&self, from: u64, max: usize) -> Batch {
        let state = self.lock();
        let (chunks, next) = state.ring.read_from(from, max);
        let caught_up = chunks.len() < max;
        Batch {
            chunks,
            next,
            exit: state
                .exit
                .as_ref()
                .filter(|_| caught_up)
                .map(|(status, _)| *status),
        }
    }

    /// Waits for the exit status.
    pub async fn wait(&self) -> ExitStatus {
        let mut changed = self.subscribe();
        loop {
            changed.borrow_and_update();
            if let Some(status) = self.exit_status() {
                return status;
            }
            // The sender lives in `self`: this only fails if `self` is gone, which it is not.
            if changed.changed().await.is_err() {
                return ExitStatus::default();
            }
        }
    }

    /// Moves the process's events into the session until the exit (run as a task).
    pub async fn collect(self: Arc<Self>, mut events: mpsc::Receiver<ProcessEvent>) {
        let status = loop {
            match events.recv().await {
                Some(ProcessEvent::Stdout(data)) => self.lock().ring.push(Stream::Stdout, data),
                Some(ProcessEvent::Stderr(data)) => self.lock().ring.push(Stream::Stderr, data),
                Some(ProcessEvent::Exit(status)) => break status,
                // The driver always ends with an exit; an outcome-less status says it did not.
                None => break ExitStatus::default(),
            }
            self.bump();
        };
        self.lock().exit = Some((status, Instant::now()));
        self.bump();
        tracing::debug!(session = %self.id, "session process exited");
        // No one writes to a finished process (writers give up the lock at its exit).
        self.stdin.lock().await.take();
    }
}

impl Entry for Session {
    fn id(&self) -> &str {
        &self.id
    }

    fn exited_at(&self) -> Option<Instant> {
        self.lock().exit.as_ref().map(|(_, at)| *at)
    }
}
