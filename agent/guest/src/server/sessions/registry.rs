//! The agent's table of detached sessions: bounded, with exited sessions reaped after a
//! retention (or earlier, oldest exit first, when the table is full).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use agent_proto::limits::is_session_id;
use tonic::Status;

/// What the registry needs to know about an entry.
pub trait Entry {
    fn id(&self) -> &str;
    /// When the entry's process exited; `None` while it runs.
    fn exited_at(&self) -> Option<Instant>;
}

/// Entries in start order; cheap to clone.
#[derive(Debug)]
pub struct Registry<T> {
    entries: Arc<Mutex<Vec<Arc<T>>>>,
    max: usize,
    retention: Duration,
}

impl<T> Clone for Registry<T> {
    fn clone(&self) -> Self {
        Self {
            entries: Arc::clone(&self.entries),
            max: self.max,
            retention: self.retention,
        }
    }
}

impl<T: Entry> Registry<T> {
    pub fn new(max: usize, retention: Duration) -> Self {
        Self {
            entries: Arc::new(Mutex::new(Vec::new())),
            max,
            retention,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<T>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops entries whose retention has passed, then, while the table is full, the one that
    /// exited first. Fails when every slot holds a running session.
    fn make_room(&self, entries: &mut Vec<Arc<T>>, now: Instant) -> Result<(), Status> {
        entries.retain(|entry| {
            entry
                .exited_at()
                .is_none_or(|at| now.saturating_duration_since(at) < self.retention)
        });
        while entries.len() >= self.max {
            let oldest_exit = entries
                .iter()
                .enumerate()
                .filter_map(|(index, entry)| entry.exited_at().map(|at| (at, index)))
                .min();
            let Some((_, index)) = oldest_exit else {
                return Err(Status::resource_exhausted(format!(
                    "{} exec sessions are running (the limit); kill or wait for one first",
                    entries.len()
                )));
            };
            entries.remove(index);
        }
        Ok(())
    }

    /// Whether a new entry would fit now (checked before spawning a process for it).
    pub fn check_room(&self, now: Instant) -> Result<(), Status> {
        let mut entries = self.lock();
        self.make_room(&mut entries, now)
    }

    /// Adds `entry`, evicting as [`Self::check_room`] does; fails when there is no room.
    pub fn insert(&self, entry: Arc<T>, now: Instant) -> Result<(), Status> {
        let mut entries = self.lock();
        self.make_room(&mut entries, now)?;
        entries.push(entry);
        Ok(())
    }

    /// Every entry still retained, in start order.
    pub fn list(&self, now: Instant) -> Vec<Arc<T>> {
        let mut entries = self.lock();
        entries.retain(|entry| {
            entry
                .exited_at()
                .is_none_or(|at| now.saturating_duration_since(at) < self.retention)
        });
        entries.clone()
    }

    /// The entry named `id`: INVALID_ARGUMENT for a malformed id, NOT_FOUND for an unknown (or
    /// reaped) one.
    pub fn get(&self, id: &str, now: Instant) -> Result<Arc<T>, Status> {
        if !is_session_id(id) {
            return Err(Status::invalid_argument(
                "a session id is 32 lowercase hex characters",
            ));
        }
        self.list(now)
            .into_iter()
            .find(|entry| entry.id() == id)
            .ok_or_else(|| Status::not_found(format!("no exec session {id}")))
    }

    /// A fresh id, unique among the retained entries.
    pub fn new_id(&self) -> String {
        loop {
            let id = random_id();
            if !self.lock().iter().any(|entry| entry.id() == id) {
                return id;
            }
        }
    }
}

/// 128 bits from the standard library's randomly keyed hasher (seeded from the OS once); ids
/// need to be unique and not trivially guessable, not secret.
fn random_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut halves = [0u64; 2];
    for (half, value) in halves.iter_mut().enumerate() {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(count);
        hasher.write_usize(half);
        *value = hasher.finish();
    }
    format!("{:016x}{:016x}", halves[0], halves[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fake {
        id: String,
        exited_at: Option<Instant>,
    }

    impl Entry for Fake {
        fn id(&self) -> &str {
            &self.id
        }
        fn exited_at(&self) -> Option<Instant> {
            self.exited_at
        }
    }

    fn fake(registry: &Registry<Fake>, exited_at: Option<Instant>) -> Arc<Fake> {
        Arc::new(Fake {
            id: registry.new_id(),
            exited_at,
        })
    }

    fn ids(entries: &[Arc<Fake>]) -> Vec<String> {
        entries.iter().map(|entry| entry.id.clone()).collect()
    }

    #[test]
    fn ids_are_valid_and_distinct() {
        let registry: Registry<Fake> = Registry::new(4, Duration::from_secs(1));
        let a = registry.new_id();
        let b = registry.new_id();
        assert!(is_session_id(&a), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn running_sessions_fill_the_table() {
        let now = Instant::now();
        let registry = Registry::new(2, Duration::from_secs(60));
        registry.insert(fake(&registry, None), now).unwrap();
        registry.insert(fake(&registry, None), now).unwrap();
        let err = registry.insert(fake(&registry, None), now).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            registry.check_room(now).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(registry.list(now).len(), 2);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_exit_first() {
        let now = Instant::now();
        let registry = Registry::new(3, Duration::from_secs(60));
        let running = fake(&registry, None);
        let exited_late = fake(&registry, Some(now));
        let exited_early = fake(&registry, Some(now - Duration::from_secs(5)));
        for entry in [&running, &exited_late, &exited_early] {
            registry.insert(Arc::clone(entry), now).unwrap();
        }
        let newcomer = fake(&registry, None);
        registry.insert(Arc::clone(&newcomer), now).unwrap();
        assert_eq!(
            ids(&registry.list(now)),
            ids(&[running, exited_late, newcomer])
        );
    }

    #[test]
    fn exited_sessions_are_reaped_after_the_retention() {
        let start = Instant::now();
        let retention = Duration::from_secs(600);
        let registry = Registry::new(8, retention);
        let running = fake(&registry, None);
        let exited = fake(&registry, Some(start));
        registry.insert(Arc::clone(&running), start).unwrap();
        registry.insert(Arc::clone(&exited), start).unwrap();
        let just_before = start + retention - Duration::from_millis(1);
        assert_eq!(registry.list(just_before).len(), 2);
        assert_eq!(registry.get(&exited.id, just_before).unwrap().id, exited.id);
        let after = start + retention;
        assert_eq!(
            ids(&registry.list(after)),
            ids(std::slice::from_ref(&running))
        );
        assert_eq!(
            registry.get(&exited.id, after).unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(registry.get(&running.id, after).unwrap().id, running.id);
    }

    #[test]
    fn malformed_ids_are_rejected_before_lookup() {
        let registry: Registry<Fake> = Registry::new(1, Duration::from_secs(1));
        for bad in ["", "x", "../../etc/passwd", &"A".repeat(32)] {
            assert_eq!(
                registry.get(bad, Instant::now()).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
        assert_eq!(
            registry
                .get(&registry.new_id(), Instant::now())
                .unwrap_err()
                .code(),
            tonic::Code::NotFound
        );
    }
}
