//! Process-wide child reaper.
//!
//! As PID 1 the agent inherits every orphan and must reap them, but it must
//! not steal the exit status of processes it spawned for `Exec`. One thread
//! owns all `waitpid` calls: it sleeps in `waitid(WNOWAIT)` until some child
//! is a zombie, then takes the registry lock and reaps everything, handing
//! statuses of registered children to their waiters and dropping the rest.
//! Spawning happens under the same lock and registers the pid before the lock
//! is released, so a child can never be reaped unregistered.
//!
//! Consequence: nothing else in this process may wait for children (no
//! `std::process::Child::wait`, no `tokio::process`).

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

use tokio::sync::oneshot;

/// Raw wait status as returned by `waitpid`.
pub type WaitStatus = i32;

/// The process-wide reaper; started on first use.
pub fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    static THREAD: OnceLock<()> = OnceLock::new();
    let reaper = REAPER.get_or_init(Reaper::default);
    THREAD.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reaper.run());
        if let Err(err) = spawned {
            tracing::error!(%err, "cannot start the reaper thread");
        }
    });
    reaper
}

#[derive(Default)]
pub struct Reaper {
    registry: Mutex<Registry>,
    /// Signalled whenever a child is spawned (wakes the thread from ECHILD).
    spawned: Condvar,
}

#[derive(Default)]
struct Registry {
    waiters: HashMap<libc::pid_t, oneshot::Sender<WaitStatus>>,
    /// Bumped on every spawn; lets the thread detect spawns that raced with
    /// an ECHILD answer.
    generation: u64,
}

impl Reaper {
    /// Spawns `command` and returns the child with a receiver for its wait
    /// status. Blocks for as long as fork/exec takes; call it off the async
    /// runtime.
    pub fn spawn(
        &self,
        command: &mut Command,
    ) -> io::Result<(Child, oneshot::Receiver<WaitStatus>)> {
        self.spawn_with(|| {
            let child = command.spawn()?;
            let pid = libc::pid_t::try_from(child.id())
                .map_err(|_| io::Error::other("child pid out of range"))?;
            Ok((pid, child))
        })
    }

    /// Runs `start` (which creates one child and returns its pid) under the registry lock, and
    /// registers the child before the lock is released.
    pub fn spawn_with<T>(
        &self,
        start: impl FnOnce() -> io::Result<(libc::pid_t, T)>,
    ) -> io::Result<(T, oneshot::Receiver<WaitStatus>)> {
        let mut registry = self.lock();
        let (pid, started) = start()?;
        let (sender, receiver) = oneshot::channel();
        registry.waiters.insert(pid, sender);
        registry.generation = registry.generation.wrapping_add(1);
        drop(registry);
        self.spawned.notify_all();
        Ok((started, receiver))
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self) {
        loop {
            let generation = self.lock().generation;
            match wait_for_zombie() {
                Ok(()) => self.reap_all(),
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                Err(err) if err.raw_os_error() == Some(libc::ECHILD) => {
                    self.wait_for_spawn(generation)
                }
                Err(err) => {
                    tracing::error!(%err, "waitid failed");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }

    fn wait_for_spawn(&self, seen: u64) {
        let mut registry = self.lock();
        while registry.generation == seen {
            registry = self
                .spawned
                .wait(registry)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn reap_all(&self) {
        let mut registry = self.lock();
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: plain syscall writing into a local int.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            match registry.waiters.remove(&pid) {
                // The waiter may have gone away; nothing to do then.
                Some(waiter) => drop(waiter.send(status)),
                None => tracing::debug!(pid, status, "reaped orphan"),
            }
        }
    }
}

/// Blocks until some child has exited, without reaping it.
fn wait_for_zombie() -> io::Result<()> {
    // SAFETY: zeroed siginfo_t is a valid out-parameter for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes only into `info`.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
