//! The warm pool (in-process sandboxes only): pre-built VM shells (`vmm::vm::VmShell`: KVM VM,
//! memory slots, irqchip, vCPUs, parked vCPU threads) per shape, so that a wake or a start from
//! a template only maps the snapshot's memory over a shell's RAM and loads its state
//! (`Vm::restore_into`). A taken shell is replaced in the background (tokio's blocking pool);
//! dropping the pool frees its shells.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use vmm::vm::{ShellShape, VmShell};
use vmm::{RestoreOptions, Vm, VmError};

/// What the pool holds and has done, for [`crate::SandboxManager::warm_pool`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WarmPoolStats {
    /// Per shape kept warm: shells ready now and the count kept.
    pub shapes: Vec<WarmShape>,
    /// Restores that ran in a ready shell.
    pub hits: u64,
    /// Restores that found no ready shell while a shape was kept (restored without one).
    pub misses: u64,
    /// Shells built so far, and the time the last one took.
    pub built: u64,
    pub last_build: Option<Duration>,
    /// Shells whose build failed (the refill stops for that shape until the next take).
    pub build_failures: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmShape {
    pub shape: ShellShape,
    pub ready: usize,
    pub keep: usize,
}

#[derive(Clone, Default)]
pub(crate) struct WarmPool {
    inner: Arc<PoolInner>,
}

#[derive(Default)]
struct PoolInner {
    shapes: Mutex<HashMap<ShellShape, Entry>>,
    hits: AtomicU64,
    misses: AtomicU64,
    built: AtomicU64,
    build_failures: AtomicU64,
    last_build_us: AtomicU64,
}

#[derive(Default)]
struct Entry {
    keep: usize,
    ready: Vec<VmShell>,
    /// A refill task is building shells for this shape.
    refilling: bool,
}

impl WarmPool {
    /// Keeps `count` shells of `shape` ready (0 frees them), refilling from now on.
    pub(crate) fn keep(&self, shape: ShellShape, count: usize) {
        let freed = {
            let mut shapes = self.lock();
            let entry = shapes.entry(shape).or_default();
            entry.keep = count;
            let surplus = entry.ready.len().saturating_sub(count);
            entry.ready.split_off(entry.ready.len() - surplus)
        };
        // Outside the lock: a shell's teardown waits for KVM.
        drop(freed);
        self.refill(shape);
    }

    /// Restores through a ready shell of the snapshot's shape when there is one, else as
    /// `Vm::restore`. Blocking.
    pub(crate) fn restore(&self, options: RestoreOptions) -> Result<Vm, VmError> {
        if options.lazy.is_some() {
            return Vm::restore(options);
        }
        // With one shape kept, its shell is tried directly (the restore checks the shape
        // anyway and hands a shell that does not fit back); with several, the snapshot's
        // state says which.
        let kept = self.kept_shapes();
        let shape = match kept.as_slice() {
            [] => return Vm::restore(options),
            [only] => *only,
            _ => ShellShape::for_snapshot(&options)?,
        };
        let Some(shell) = self.take(shape) else {
            self.inner.misses.fetch_add(1, Ordering::Relaxed);
            // A refill stopped by a failed build starts again at a take, hit or miss.
            self.refill(shape);
            return Vm::restore(options);
        };
        let restored = self.restore_into(shell, options);
        // Refilled once the restore is done, not during it: building a shell (a KVM VM, its
        // memory slots, vCPU threads) competed with the restore for this process's memory map
        // and the host's CPUs, and made a pooled start slower than an unpooled one.
        self.refill(shape);
        restored
    }

    /// Restores into `shell`; a shell refused for its shape goes back to the pool and the
    /// restore runs without one.
    fn restore_into(&self, shell: VmShell, options: RestoreOptions) -> Result<Vm, VmError> {
        match Vm::restore_into(shell, options) {
            Ok(vm) => {
                self.inner.hits.fetch_add(1, Ordering::Relaxed);
                Ok(vm)
            }
            Err(e) => match e.refused {
                Some(refused) => {
                    let (shell, options) = *refused;
                    self.put_back(shell);
                    tracing::debug!("warm pool: not restoring into a shell: {}", e.error);
                    if !matches!(e.error, VmError::ShellMismatch { .. }) {
                        // A snapshot `Vm::restore` would refuse as well: its error.
                        return Err(e.error);
                    }
                    Vm::restore(options)
                }
                None => Err(e.error),
            },
        }
    }

    fn kept_shapes(&self) -> Vec<ShellShape> {
        self.lock()
            .iter()
            .filter(|(_, e)| e.keep > 0)
            .map(|(shape, _)| *shape)
            .collect()
    }

    /// A ready shell of `shape`, if one is kept and ready (the caller refills).
    fn take(&self, shape: ShellShape) -> Option<VmShell> {
        let mut shapes = self.lock();
        let entry = shapes.get_mut(&shape)?;
        if entry.keep == 0 {
            return None;
        }
        entry.ready.pop()
    }

    fn put_back(&self, shell: VmShell) {
        let unwanted = {
            let mut shapes = self.lock();
            match shapes.get_mut(&shell.shape()) {
                Some(entry) if entry.ready.len() < entry.keep => {
                    entry.ready.push(shell);
                    None
                }
                _ => Some(shell),
            }
        };
        // Outside the lock: a shell's teardown waits for KVM.
        drop(unwanted);
    }

    pub(crate) fn stats(&self) -> WarmPoolStats {
        let shapes = self
            .lock()
            .iter()
            .filter(|(_, e)| e.keep > 0 || !e.ready.is_empty())
            .map(|(shape, e)| WarmShape {
                shape: *shape,
                ready: e.ready.len(),
                keep: e.keep,
            })
            .collect();
        let last = self.inner.last_build_us.load(Ordering::Relaxed);
        WarmPoolStats {
            shapes,
            hits: self.inner.hits.load(Ordering::Relaxed),
            misses: self.inner.misses.load(Ordering::Relaxed),
            built: self.inner.built.load(Ordering::Relaxed),
            last_build: (last > 0).then(|| Duration::from_micros(last)),
            build_failures: self.inner.build_failures.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ShellShape, Entry>> {
        self.inner.shapes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a background task that builds shells of `shape` one at a time until the count
    /// kept is ready, unless one runs already. Outside a tokio runtime the pool is not refilled.
    fn refill(&self, shape: ShellShape) {
        {
            let mut shapes = self.lock();
            let Some(entry) = shapes.get_mut(&shape) else {
                return;
            };
            if entry.refilling || entry.ready.len() >= entry.keep {
                return;
            }
            entry.refilling = true;
        }
        let pool = Arc::downgrade(&self.inner);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("warm pool: no tokio runtime to refill on");
            self.lock().entry(shape).or_default().refilling = false;
            return;
        };
        runtime.spawn_blocking(move || refill_blocking(&pool, shape));
    }
}

/// Builds shells of `shape` until the pool holds as many as it keeps, or is gone.
fn refill_blocking(pool: &Weak<PoolInner>, shape: ShellShape) {
    loop {
        let started = Instant::now();
        let built = VmShell::build(shape);
        let took = started.elapsed();
        let Some(inner) = pool.upgrade() else {
            // The manager is gone: the shell goes with this task.
            return;
        };
        let mut shapes = inner.shapes.lock().unwrap_or_else(|e| e.into_inner());
        let entry = shapes.entry(shape).or_default();
        let unwanted = match built {
            Ok(shell) => {
                inner.built.fetch_add(1, Ordering::Relaxed);
                inner.last_build_us.store(
                    u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1),
                    Ordering::Relaxed,
                );
                if entry.ready.len() < entry.keep {
                    entry.ready.push(shell);
                    None
                } else {
                    Some(shell)
                }
            }
            Err(e) => {
                inner.build_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("warm pool: building a VM shell of {shape:?} failed: {e}");
                entry.refilling = false;
                return;
            }
        };
        let done = entry.ready.len() >= entry.keep;
        if done {
            entry.refilling = false;
        }
        drop(shapes);
        // Outside the lock: a shell's teardown waits for KVM.
        drop(unwanted);
        if done {
            return;
        }
    }
}
