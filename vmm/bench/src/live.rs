//! The live-snapshot rows of `bench snapshot`: per size, the tiny guest idle, all touched (then
//! halted), and busy (the `WriteForever` guest, which keeps rewriting all its memory). Each
//! VM takes one warm-up snapshot (the process's first probes MSRs and turns on KVM's dirty
//! log), then snapshots paused (pause → snapshot → resume, timed from outside: the guest is
//! paused for all of it) and live (`"live": true` on the running VM: the guest is paused for
//! the `paused_us` the VMM reports; "complete" is the request's round trip, files in place).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use vmm::tiny_guest::{self, TinyGuestEnd};
use vmm_api::SnapshotRequest;

use crate::page_cache::flush_file_system;
use crate::plot;
use crate::report::{ms, stats, Stats};
use crate::snapshot::{boot, scratch_dir, size_label, verdict, Case};

const MIB: u64 = 1 << 20;
/// A snapshot of a touched 2 GiB guest writes 2 GiB: a few runs give a median.
const MAX_RUNS: usize = 5;
const TARGET_LIVE_PAUSE: Duration = Duration::from_millis(5);

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum LiveLoad {
    Idle,
    Touched,
    Busy,
}

impl LiveLoad {
    fn label(self) -> &'static str {
        match self {
            LiveLoad::Idle => "idle",
            LiveLoad::Touched => "all touched",
            LiveLoad::Busy => "busy (rewrites all memory)",
        }
    }
}

pub(crate) struct LiveRow {
    mem_mib: u64,
    load: LiveLoad,
    paused_snapshot: Stats,
    live_paused: Stats,
    live_complete: Stats,
}

/// Boots each guest and measures both modes.
pub(crate) fn bench_live(sizes_mib: &[u64], runs: usize) -> anyhow::Result<Vec<LiveRow>> {
    let dir = scratch_dir()?;
    let result = bench_in(&dir, sizes_mib, runs);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn bench_in(dir: &Path, sizes_mib: &[u64], runs: usize) -> anyhow::Result<Vec<LiveRow>> {
    let runs = runs.clamp(1, MAX_RUNS);
    let mut rows = Vec::new();
    for &mem_mib in sizes_mib {
        for load in [LiveLoad::Idle, LiveLoad::Touched, LiveLoad::Busy] {
            let row = measure(dir, mem_mib, load, runs).with_context(|| {
                format!("live snapshots of {} {}", size_label(mem_mib), load.label())
            })?;
            rows.push(row);
        }
    }
    Ok(rows)
}

fn measure(dir: &Path, mem_mib: u64, load: LiveLoad, runs: usize) -> anyhow::Result<LiveRow> {
    let mem_bytes = mem_mib * MIB;
    let (end, ready) = match load {
        LiveLoad::Idle => (TinyGuestEnd::Idle, "dormouse-tiny-guest\n"),
        LiveLoad::Touched => (
            TinyGuestEnd::TouchAll { mem_bytes },
            "dormouse-tiny-guest: touched\n",
        ),
        LiveLoad::Busy => (TinyGuestEnd::WriteForever { mem_bytes }, "tiny-pass\n"),
    };
    let kernel = dir.join(format!("tiny-live-{mem_mib}.elf"));
    tiny_guest::write_to(&kernel, end)?;
    let case = Case {
        label: String::new(),
        kernel,
        initrd: None,
        mem_mib,
        ready,
        settle: Duration::ZERO,
        tiny: true,
        touched: load != LiveLoad::Idle,
        mem_dir: false,
    };
    let vm = boot(&case, dir)?;
    let snap = dir.join("live-snap");
    let take = |live: bool| -> anyhow::Result<vmm_api::SnapshotInfo> {
        let _ = std::fs::remove_dir_all(&snap);
        // Each sample starts with the previous one's pages written back (as the main table).
        flush_file_system(dir)?;
        let info = vm.client.snapshot_with(SnapshotRequest {
            dir: snap.clone(),
            diff: false,
            replace: false,
            live,
        })?;
        Ok(info)
    };
    take(false).context("warm-up snapshot")?;
    let mut paused_snapshot = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        vm.client.pause().context("pause")?;
        take(false).context("paused snapshot")?;
        vm.client.resume().context("resume")?;
        paused_snapshot.push(t.elapsed());
    }
    let mut live_paused = Vec::with_capacity(runs);
    let mut live_complete = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let info = take(true).context("live snapshot")?;
        live_complete.push(t.elapsed());
        if let Some(reason) = info.live_unavailable {
            anyhow::bail!("the snapshot was not live: {reason}");
        }
        live_paused.push(Duration::from_micros(info.paused_us));
    }
    let _ = std::fs::remove_dir_all(&snap);
    Ok(LiveRow {
        mem_mib,
        load,
        paused_snapshot: stats(paused_snapshot).context("no samples")?,
        live_paused: stats(live_paused).context("no samples")?,
        live_complete: stats(live_complete).context("no samples")?,
    })
}

/// The live table, then the verdicts that compare with Cloud Hypervisor's rows of the same run
/// (`peers`; absent when it did not run).
pub(crate) fn print_live(rows: &[LiveRow], dormouse: &[plot::Series], peers: &[plot::Series]) {
    println!();
    println!(
        "| live snapshot (tiny guest; medians) | paused snapshot: guest paused | live: guest \
         paused | live: snapshot complete |"
    );
    println!("|---|---|---|---|");
    for r in rows {
        println!(
            "| {} {} | {} | {} | {} |",
            size_label(r.mem_mib),
            r.load.label(),
            ms(r.paused_snapshot.median),
            ms(r.live_paused.median),
            ms(r.live_complete.median),
        );
    }
    println!();
    println!("| live-snapshot target | figure | verdict |");
    println!("|---|---|---|");
    if let Some(worst) = rows.iter().map(|r| r.live_paused.median).max() {
        println!(
            "| live: guest paused ≤ {} on every row | worst median {} | {} |",
            ms(TARGET_LIVE_PAUSE),
            ms(worst),
            verdict(worst <= TARGET_LIVE_PAUSE)
        );
    }
    let cloud = peers.iter().find(|s| s.vmm.contains("cloud"));
    let peer_create = |mem_mib: u64, load: plot::Load| {
        cloud?
            .points
            .iter()
            .find(|p| p.mem_mib == mem_mib && p.load == load)
            .map(|p| p.create)
    };
    for r in rows.iter().filter(|r| r.load == LiveLoad::Touched) {
        match peer_create(r.mem_mib, plot::Load::AllTouched) {
            Some(ch) => println!(
                "| live: complete snapshot of a touched {} guest ≤ ½ Cloud Hypervisor's ({}) | {} | {} |",
                size_label(r.mem_mib),
                ms(ch / 2),
                ms(r.live_complete.median),
                verdict(r.live_complete.median <= ch / 2)
            ),
            None => println!(
                "| live: complete snapshot of a touched {} guest ≤ ½ Cloud Hypervisor's | {} | no Cloud Hypervisor row in this run |",
                size_label(r.mem_mib),
                ms(r.live_complete.median)
            ),
        }
    }
    // The paused path against Cloud Hypervisor's on every row both ran.
    if let Some(ours) = dormouse.iter().find(|s| s.vmm == "dormouse") {
        for p in &ours.points {
            if let Some(ch) = peer_create(p.mem_mib, p.load) {
                println!(
                    "| paused snapshot ≤ Cloud Hypervisor's: {} {:?} | {} vs {} | {} |",
                    size_label(p.mem_mib),
                    p.load,
                    ms(p.create),
                    ms(ch),
                    verdict(p.create <= ch)
                );
            }
        }
    }
}
