//! Density, for `dormouse bench sandbox --density N`: N sandboxes restored from one template,
//! all running at once, each answering the agent's `Ping` — the time to start them all and
//! the host memory each one costs beyond the template's page cache; then the same for
//! Firecracker restoring its own snapshot of the same guest N times (`peers::sandbox_fc`).
//!
//! Memory is measured three ways, because each hides something: the drop of the host's
//! `MemAvailable` (everything: guest pages written since the restore, the VMM's heap, page
//! tables and KVM's own memory), private pages of the VMM processes (`Private_Clean` +
//! `Private_Dirty`: what the sandboxes do not share with the template's page cache) and PSS
//! (which adds a 1/N share of the shared pages).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use vmm_sandbox::{SandboxConfig, SandboxId, SandboxManager};

use crate::report::{ms, stats};

/// How long one sandbox may take from the start of the batch to answering its Ping.
const START_TIMEOUT: Duration = Duration::from_secs(600);
/// Let page tables and lazily touched pages settle before memory is read.
const SETTLE: Duration = Duration::from_secs(2);

/// What N running sandboxes of one VMM cost.
pub struct DensityFigures {
    pub count: usize,
    /// First start requested → the last one answered its Ping.
    pub all_started: Duration,
    /// Per sandbox: its own start → its Ping answered.
    pub start_median: Duration,
    /// How many answered a Ping again once all were running.
    pub answering: usize,
    pub per_sandbox: MemoryPerSandbox,
}

impl DensityFigures {
    /// The figures of `count` running sandboxes: each one's own start → Ping in `starts`, host
    /// memory read `before` they started and `after` all ran.
    pub fn new(
        count: usize,
        all_started: Duration,
        starts: Vec<Duration>,
        answering: usize,
        before: MemoryReading,
        after: MemoryReading,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            count,
            all_started,
            start_median: stats(starts).context("no starts")?.median,
            answering,
            per_sandbox: MemoryReading::per_sandbox(before, after, count),
        })
    }
}

/// Host memory per running sandbox, in KiB.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryPerSandbox {
    pub mem_available_drop_kib: f64,
    pub private_kib: f64,
    pub pss_kib: f64,
}

/// A host-wide and per-process memory reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryReading {
    pub mem_available_kib: u64,
    pub private_kib: u64,
    pub pss_kib: u64,
}

impl MemoryReading {
    /// The host's `MemAvailable` and the summed private/PSS pages of `pids`.
    pub fn of(pids: &[u32]) -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mut reading = MemoryReading {
            mem_available_kib: kib_field(&meminfo, "MemAvailable:"),
            ..Self::default()
        };
        for pid in pids {
            let rollup =
                std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            reading.private_kib +=
                kib_field(&rollup, "Private_Clean:") + kib_field(&rollup, "Private_Dirty:");
            reading.pss_kib += kib_field(&rollup, "Pss:");
        }
        reading
    }

    /// What each of `count` sandboxes added between `before` and `after`.
    pub fn per_sandbox(before: Self, after: Self, count: usize) -> MemoryPerSandbox {
        let n = count.max(1) as f64;
        let grew = |b: u64, a: u64| a.saturating_sub(b) as f64 / n;
        MemoryPerSandbox {
            mem_available_drop_kib: before
                .mem_available_kib
                .saturating_sub(after.mem_available_kib) as f64
                / n,
            private_kib: grew(before.private_kib, after.private_kib),
            pss_kib: grew(before.pss_kib, after.pss_kib),
        }
    }
}

/// A `Name:   123 kB` field of /proc/meminfo or smaps_rollup (0 when absent).
fn kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `count` in-process sandboxes from `checkpoint`, started together; all are killed before
/// this returns.
pub async fn dormouse(
    manager: &SandboxManager,
    checkpoint: &Path,
    count: usize,
) -> anyhow::Result<DensityFigures> {
    let me = [std::process::id()];
    let before = MemoryReading::of(&me);
    let started = Instant::now();
    let mut starting = tokio::task::JoinSet::new();
    for _ in 0..count {
        let manager = manager.clone();
        let mut config = SandboxConfig::template(checkpoint);
        config.agent_timeout = START_TIMEOUT;
        starting.spawn(async move {
            let own = Instant::now();
            // `create` returns once the agent answered its first Ping.
            let id = manager.create(config).await?;
            anyhow::Ok((id, own.elapsed()))
        });
    }
    let mut ids: Vec<SandboxId> = Vec::with_capacity(count);
    let mut starts = Vec::with_capacity(count);
    let mut failure = None;
    while let Some(joined) = starting.join_next().await {
        match joined.context("a sandbox start task").and_then(|r| r) {
            Ok((id, took)) => {
                ids.push(id);
                starts.push(took);
            }
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    let all_started = started.elapsed();
    let figures = match failure {
        Some(e) => Err(e.context(format!("starting {count} sandboxes from one template"))),
        None => measure_running(manager, &ids, before, all_started, starts).await,
    };
    for id in &ids {
        let _ = manager.kill(id).await;
    }
    figures
}

async fn measure_running(
    manager: &SandboxManager,
    ids: &[SandboxId],
    before: MemoryReading,
    all_started: Duration,
    starts: Vec<Duration>,
) -> anyhow::Result<DensityFigures> {
    tokio::time::sleep(SETTLE).await;
    let mut answering = 0;
    for id in ids {
        if let Ok(agent) = manager.agent(id).await {
            if agent.ping().await.is_ok() {
                answering += 1;
            }
        }
    }
    let after = MemoryReading::of(&[std::process::id()]);
    DensityFigures::new(ids.len(), all_started, starts, answering, before, after)
}

fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

/// The density table: dormouse's row, then each peer's (or why it has none).
pub fn print(count: usize, rows: &[(&str, anyhow::Result<DensityFigures>)]) {
    println!(
        "| density: {count} sandboxes from one template, all running (each answered Ping) \
         | all started (first request → last Ping) | start → Ping, median | answering Ping \
         afterwards | host MemAvailable drop per sandbox | private per sandbox | PSS per sandbox |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, figures) in rows {
        match figures {
            Ok(f) => println!(
                "| {name} | {} | {} | {} / {} | {} | {} | {} |",
                ms(f.all_started),
                ms(f.start_median),
                f.answering,
                f.count,
                mib(f.per_sandbox.mem_available_drop_kib),
                mib(f.per_sandbox.private_kib),
                mib(f.per_sandbox.pss_kib),
            ),
            Err(e) => println!(
                "| {name} | failed: {} | | | | | |",
                format!("{e:#}").replace(['|', '\n'], " ")
            ),
        }
    }
    println!(
        "\nPrivate pages are what a sandbox does not share with the template's page cache \
         (guest pages written since the restore, the VMM's own heap); the MemAvailable drop \
         adds the host kernel's memory for it (page tables, KVM) and is noisy; PSS adds a \
         1/N share of the shared pages."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_in_kib() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   1234 kB\n";
        assert_eq!(kib_field(text, "MemAvailable:"), 1234);
        assert_eq!(kib_field(text, "Pss:"), 0);
    }

    #[test]
    fn growth_is_shared_among_the_sandboxes() {
        let before = MemoryReading {
            mem_available_kib: 10_000,
            private_kib: 100,
            pss_kib: 200,
        };
        let after = MemoryReading {
            mem_available_kib: 6_000,
            private_kib: 2_100,
            pss_kib: 4_200,
        };
        let each = MemoryReading::per_sandbox(before, after, 4);
        assert_eq!(each.mem_available_drop_kib, 1000.0);
        assert_eq!(each.private_kib, 500.0);
        assert_eq!(each.pss_kib, 1000.0);
        // Memory that went back to the host between the readings is not negative cost.
        assert_eq!(
            MemoryReading::per_sandbox(after, before, 4).private_kib,
            0.0
        );
    }

    #[test]
    fn this_process_has_private_pages() {
        let reading = MemoryReading::of(&[std::process::id()]);
        assert!(reading.mem_available_kib > 0);
        assert!(reading.private_kib > 0);
        assert!(reading.pss_kib >= reading.private_kib);
    }
}
