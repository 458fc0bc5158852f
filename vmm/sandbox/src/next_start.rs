//! The next in-process start's identity, made ahead of it: its sandbox id, its work directory
//! and its counters (`VmMetrics` under that id). Making the directory on the work file system
//! and the counters' registry took about 0.2 ms of a pooled create's host part on the
//! development host; made after the previous start, they are off the next one's path.
//!
//! At most one is kept. A start that finds none makes its own, as before; an unused one's
//! (empty) directory is removed with the manager.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::identity::{Identities, SandboxId};
use super::start::metrics_for;

/// An identity made ahead: `dir` exists (empty), `metrics` count under `id`.
pub struct Prepared {
    pub id: SandboxId,
    pub dir: PathBuf,
    pub metrics: vmm::metrics::VmMetrics,
}

#[derive(Default)]
pub struct NextStart {
    ready: Mutex<Option<Prepared>>,
}

impl NextStart {
    /// The identity made ahead, if one is ready.
    pub fn take(&self) -> Option<Prepared> {
        self.lock().take()
    }

    /// Makes the next identity when none is ready, under `work_dir` (blocking: a directory is
    /// made). A failure leaves none ready: the next start makes its own, and reports it.
    pub fn prepare(&self, ids: &Identities, work_dir: &Path) {
        if self.lock().is_some() {
            return;
        }
        let id = ids.sandbox_id();
        let dir = work_dir.join(id.as_str());
        if let Err(e) = std::fs::create_dir(&dir) {
            tracing::debug!("next sandbox: not made ahead: {}: {e}", dir.display());
            return;
        }
        let metrics = match metrics_for(&id) {
            Ok(metrics) => metrics,
            Err(e) => {
                tracing::debug!("next sandbox: not made ahead: {e}");
                remove_unused(&dir);
                return;
            }
        };
        let mut ready = self.lock();
        if ready.is_some() {
            // Another prepare won meanwhile; this id is simply never used.
            drop(ready);
            remove_unused(&dir);
            return;
        }
        *ready = Some(Prepared { id, dir, metrics });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Prepared>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for NextStart {
    fn drop(&mut self) {
        if let Some(unused) = self.lock().take() {
            remove_unused(&unused.dir);
        }
    }
}

/// Removes a directory made ahead and never used (empty: `remove_dir` leaves anything else).
fn remove_unused(dir: &Path) {
    if let Err(e) = std::fs::remove_dir(dir) {
        tracing::debug!("next sandbox: removing {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_made_ahead_is_taken_once_and_its_directory_goes_with_the_manager() {
        let work = tempfile::tempdir().unwrap();
        let ids = Identities::new(100);
        let next = NextStart::default();
        assert!(next.take().is_none(), "nothing made yet");
        next.prepare(&ids, work.path());
        // One is kept: a second prepare hands out no id.
        next.prepare(&ids, work.path());
        let made = next.take().expect("made ahead");
        assert_eq!(made.id.as_str(), "sb-1");
        assert_eq!(made.dir, work.path().join("sb-1"));
        assert!(made.dir.is_dir());
        assert_eq!(made.metrics.vm_id(), "sb-1");
        assert!(next.take().is_none(), "taken once");
        assert_eq!(
            ids.sandbox_id().as_str(),
            "sb-2",
            "no id was spent on the second prepare"
        );

        // An unused one's directory is removed with it; a used one's stays (its sandbox's).
        next.prepare(&ids, work.path());
        let unused = work.path().join("sb-3");
        assert!(unused.is_dir());
        drop(next);
        assert!(!unused.exists());
        assert!(made.dir.is_dir());
    }

    #[test]
    fn a_work_directory_that_cannot_take_it_leaves_none_ready() {
        let work = tempfile::tempdir().unwrap();
        let ids = Identities::new(100);
        let next = NextStart::default();
        next.prepare(&ids, &work.path().join("missing"));
        assert!(next.take().is_none());
    }
}
