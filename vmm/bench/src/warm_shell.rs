//! `dormouse bench snapshot`'s warm-shell rows: a restore into a pre-built VM shell
//! (`Vm::restore_into`, what the sandbox library's warm pool does) against a fresh
//! `Vm::restore` of the same snapshot, both in this process and with the sandbox library's
//! restore settings (seccomp enforcing, no dirty log), interleaved; the time to build a shell
//! (the pool's refill); and what a ready shell costs while it waits.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use vmm::vm::{ShellShape, VmShell};
use vmm::{Console, RestoreOptions, Vm};

use crate::report::{stats, Stats};

/// The target for a wake from the warm pool to running vCPUs.
pub(crate) const TARGET_WARM_RESTORE: Duration = Duration::from_millis(1);
/// Shells built at once for the idle-cost figures (each reserves its RAM, touches none).
pub(crate) const IDLE_SHELLS: usize = 8;

pub(crate) struct WarmFigures {
    /// `Vm::restore` → vCPUs running.
    pub(crate) fresh: Stats,
    /// `Vm::restore_into` a ready shell → vCPUs running.
    pub(crate) warm: Stats,
    /// `VmShell::build`.
    pub(crate) build: Stats,
}

/// Per shell, with [`IDLE_SHELLS`] of them built and waiting.
#[derive(Clone, Copy, Default)]
pub(crate) struct IdleCost {
    pub(crate) rss_kib: u64,
    /// Slab + PageTables + KernelStack.
    pub(crate) kernel_kib: u64,
    pub(crate) mem_available_kib: u64,
}

fn options(snap: &Path) -> RestoreOptions {
    let mut options = RestoreOptions::new(snap);
    options.console = Console::Null;
    // As the sandbox library restores (start::wake, start::plan_template).
    options.dirty_log = false;
    options
}

fn stop(vm: Vm) {
    vm.controller().shutdown();
    let _ = vm.wait();
}

/// Fresh restores and restores into a shell of `snap`, interleaved, `runs` each.
pub(crate) fn measure(snap: &Path, runs: usize) -> anyhow::Result<WarmFigures> {
    let shape = ShellShape::for_snapshot(&options(snap)).context("the snapshot's shape")?;
    // Warms the page cache and this process's one-time set-up (the SIGSYS handler, KVM caps).
    stop(Vm::restore(options(snap)).context("restore")?);
    let (mut fresh, mut warm, mut build) = (
        Vec::with_capacity(runs),
        Vec::with_capacity(runs),
        Vec::with_capacity(runs),
    );
    for _ in 0..runs {
        let t = Instant::now();
        let vm = Vm::restore(options(snap)).context("restore")?;
        fresh.push(t.elapsed());
        stop(vm);

        let t = Instant::now();
        let shell = VmShell::build(shape).context("building a VM shell")?;
        build.push(t.elapsed());
        // A pool's shell waits a while before it is taken: its threads are parked by then.
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        let vm = Vm::restore_into(shell, options(snap))
            .map_err(|e| e.error)
            .context("restore into a shell")?;
        warm.push(t.elapsed());
        stop(vm);
    }
    Ok(WarmFigures {
        fresh: stats(fresh).context("no samples")?,
        warm: stats(warm).context("no samples")?,
        build: stats(build).context("no samples")?,
    })
}

/// What [`IDLE_SHELLS`] shells of `snap`'s shape cost while they wait, per shell: this
/// process's RSS and the kernel's memory (from /proc/meminfo, so other activity on the host
/// shows up too).
pub(crate) fn idle_cost(snap: &Path) -> anyhow::Result<IdleCost> {
    let shape = ShellShape::for_snapshot(&options(snap)).context("the snapshot's shape")?;
    // One first, so that one-time costs (thread-local set-up, allocator arenas) are not counted.
    drop(VmShell::build(shape).context("building a VM shell")?);
    std::thread::sleep(Duration::from_millis(100));
    let before = Sample::now();
    let shells = (0..IDLE_SHELLS)
        .map(|_| VmShell::build(shape))
        .collect::<Result<Vec<_>, _>>()
        .context("building VM shells")?;
    std::thread::sleep(Duration::from_millis(200));
    let after = Sample::now();
    drop(shells);
    let per = |b: u64, a: u64| a.saturating_sub(b) / IDLE_SHELLS as u64;
    Ok(IdleCost {
        rss_kib: per(before.rss_kib, after.rss_kib),
        kernel_kib: per(before.kernel_kib, after.kernel_kib),
        mem_available_kib: per(after.mem_available_kib, before.mem_available_kib),
    })
}

struct Sample {
    rss_kib: u64,
    kernel_kib: u64,
    mem_available_kib: u64,
}

impl Sample {
    fn now() -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kernel = ["Slab:", "PageTables:", "KernelStack:"]
            .iter()
            .map(|f| field_kib(&meminfo, f))
            .sum();
        Self {
            rss_kib: field_kib(&status, "VmRSS:"),
            kernel_kib: kernel,
            mem_available_kib: field_kib(&meminfo, "MemAvailable:"),
        }
    }
}

/// `Field:   123 kB` → 123 (0 when absent).
fn field_kib(text: &str, field: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::field_kib;

    #[test]
    fn meminfo_fields_read_well() {
        let text = "MemTotal:       16384 kB\nSlab:             512 kB\n";
        assert_eq!(field_kib(text, "Slab:"), 512);
        assert_eq!(field_kib(text, "PageTables:"), 0);
    }
}
