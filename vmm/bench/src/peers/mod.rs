//! Peer VMMs in `dormouse bench snapshot`: QEMU, Firecracker and Cloud Hypervisor, when their
//! binaries are on PATH, run the same tiny guest image as dormouse's tiny rows (the portable
//! ELF of `vmm::tiny_guest`, which has a 64-bit entry and a PVH entry) through the same steps:
//! boot with N MiB → wait for the guest's ready line → pause → snapshot (timed; memory file
//! apparent and allocated size) → kill → restore in a new process (timed from spawn to running
//! vCPUs) → RSS after restore. Each peer is one `PeerVmm`; `measure` drives any of them. A
//! peer that fails prints its error in its row and never fails the bench. With `--kernel` the
//! Linux guest's rows get the same treatment: the peers boot the same `vmlinux` and initrd with
//! dormouse's command line, wait for the same "Run /init" line and settle time.
//!
//! First, always: dormouse itself through its Firecracker-compatible API (`dormouse_fc`), the
//! Firecracker runner pointed at a `firecracker` link to this binary, with a boot column
//! (process start → InstanceStart answered → guest's ready line).
//!
//! The QEMU runner is verified against Debian's QEMU 7.2, the Firecracker and Cloud Hypervisor
//! runners against Firecracker v1.16.1 and Cloud Hypervisor v53 (binaries built from source in
//! ../shared/peers/bin).

mod cloud_hypervisor;
mod dormouse_fc;
mod firecracker;
mod http;
pub(super) mod process;
mod qemu;
pub mod sandbox_fc;
pub mod sandbox_peer;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::ValueEnum;

use crate::plot;
use crate::report::{bytes, kib, ms, stats, Stats};

/// Whether `bench snapshot` runs the peers it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, ValueEnum)]
pub enum PeerMode {
    /// Run every peer VMM found on PATH.
    #[default]
    Auto,
    /// Run none (only say which were found).
    None,
}

/// One tiny-guest case, as a peer sees it.
pub struct PeerGuest {
    /// "64 MiB idle", "2 GiB all touched": the row label after the peer's name.
    pub label: String,
    /// The portable tiny guest image (PVH note + 64-bit entry) or the Linux `vmlinux`: the same
    /// file dormouse ran.
    pub elf: PathBuf,
    /// Set for a Linux guest; None for the tiny guest (which reads no command line).
    pub linux: Option<LinuxBoot>,
    pub mem_mib: u64,
    /// Where the guest's points go in `--plot`'s chart.
    pub load: plot::Load,
    /// Console text that says the guest is ready.
    pub ready: &'static [u8],
}

/// What a Linux guest boots with besides its kernel, as dormouse ran it.
#[derive(Clone, Debug)]
pub struct LinuxBoot {
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// How long to let init settle after the ready line, before the first measurement.
    pub settle: Duration,
}

/// Dormouse's figures for the same guest, for the ratios.
#[derive(Clone, Copy)]
pub struct DormouseFigures {
    pub snapshot: Duration,
    pub allocated: u64,
    /// Process start → vCPUs running.
    pub restore: Duration,
    pub rss_kib: u64,
}

/// A guest and dormouse's figures on it.
pub struct Compared {
    pub guest: PeerGuest,
    pub dormouse: DormouseFigures,
}

/// What one peer VMM must do; `measure` sequences it.
pub trait PeerVmm {
    type Vm: PeerVm;
    /// Row label prefix ("qemu").
    fn name(&self) -> &'static str;
    /// The binary looked up on PATH.
    fn program(&self) -> &'static str;
    /// Said next to the peer's figures.
    fn provenance(&self) -> &'static str;
    /// Boots `guest`; returns once its console printed `guest.ready`.
    fn boot(&self, bin: &Path, guest: &PeerGuest, work: &Path) -> anyhow::Result<Self::Vm>;
    /// A new process restored from `snap_dir`; returns once its vCPUs run.
    fn restore(
        &self,
        bin: &Path,
        guest: &PeerGuest,
        snap_dir: &Path,
        work: &Path,
    ) -> anyhow::Result<Self::Vm>;
    /// The file holding guest memory in a snapshot directory.
    fn memory_file(&self, snap_dir: &Path) -> PathBuf;
}

/// A running peer VM (its process is killed when dropped).
pub trait PeerVm {
    fn pause(&mut self) -> anyhow::Result<()>;
    fn resume(&mut self) -> anyhow::Result<()>;
    /// Snapshots the paused VM into the existing directory `dir`; returns once it is written.
    fn snapshot(&mut self, dir: &Path) -> anyhow::Result<()>;
    fn pid(&self) -> u32;
}

/// Writing 2 GiB one byte per page takes seconds where guest ring 0 is emulated.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Peers' snapshots of touched guests write every page: fewer runs than dormouse's.
const MAX_SNAPSHOT_RUNS: usize = 3;
/// QEMU reads its whole stream on restore: seconds per run at 2 GiB.
const MAX_RESTORE_RUNS: usize = 5;
/// Any single API call or restore.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

struct PeerFigures {
    /// Process start → InstanceStart (or the peer's start) answered → the guest's ready line.
    boot: Duration,
    pause: Stats,
    snapshot: Stats,
    first_snapshot: Duration,
    apparent: u64,
    allocated: u64,
    restore: Stats,
    rss_kib: u64,
}

/// One peer's outcome on one guest.
struct PeerRow {
    vmm: &'static str,
    mem_mib: u64,
    load: plot::Load,
    label: String,
    figures: anyhow::Result<PeerFigures>,
    dormouse: DormouseFigures,
}

/// Runs every peer found (unless `mode` is `None`) on every guest and prints the peer table,
/// the ratios table and a line per peer. Never fails: a failing peer shows its error. Returns
/// the peers' figures for the chart, one series per peer that measured something.
pub fn bench_peers(
    mode: PeerMode,
    compared: &[Compared],
    scratch: &Path,
    runs: usize,
) -> Vec<plot::Series> {
    let qemu = qemu::Qemu;
    let firecracker = firecracker::Firecracker;
    let cloud_hypervisor = cloud_hypervisor::CloudHypervisor;
    let mut rows = Vec::new();
    let mut lines = Vec::new();
    match dormouse_fc::link(scratch) {
        Ok(bin) => {
            let peer = dormouse_fc::DormouseFcApi;
            run_found(&peer, &bin, compared, scratch, runs, &mut rows);
            lines.push(format!(
                "{}: run above ({})",
                peer.program(),
                peer.provenance()
            ));
        }
        Err(e) => lines.push(format!("dormouse firecracker: not run: {}", cell_text(&e))),
    }
    run_peer(&qemu, mode, compared, scratch, runs, &mut rows, &mut lines);
    run_peer(
        &firecracker,
        mode,
        compared,
        scratch,
        runs,
        &mut rows,
        &mut lines,
    );
    run_peer(
        &cloud_hypervisor,
        mode,
        compared,
        scratch,
        runs,
        &mut rows,
        &mut lines,
    );
    println!();
    if !rows.is_empty() {
        print_tables(&rows, runs);
        println!();
    }
    for line in lines {
        println!("{line}");
    }
    plot_series(&rows)
}

/// The peers' medians, grouped by peer in the order they ran; failed rows are left out.
fn plot_series(rows: &[PeerRow]) -> Vec<plot::Series> {
    let mut series: Vec<plot::Series> = Vec::new();
    for r in rows {
        let Ok(f) = &r.figures else { continue };
        let point = plot::Point {
            mem_mib: r.mem_mib,
            load: r.load,
            create: f.snapshot.median,
            restore: f.restore.median,
        };
        match series.iter_mut().find(|s| s.vmm == r.vmm) {
            Some(s) => s.points.push(point),
            None => series.push(plot::Series {
                vmm: r.vmm.to_string(),
                points: vec![point],
            }),
        }
    }
    series
}

fn run_peer<P: PeerVmm>(
    peer: &P,
    mode: PeerMode,
    compared: &[Compared],
    scratch: &Path,
    runs: usize,
    rows: &mut Vec<PeerRow>,
    lines: &mut Vec<String>,
) {
    let program = peer.program();
    let Some(bin) = find_on_path(program) else {
        lines.push(format!("{program}: not found ({})", peer.provenance()));
        return;
    };
    if mode == PeerMode::None {
        lines.push(format!(
            "{program}: found at {}, not run (--peers none)",
            bin.display()
        ));
        return;
    }
    run_found(peer, &bin, compared, scratch, runs, rows);
    lines.push(format!(
        "{program}: found at {}, run above ({})",
        bin.display(),
        peer.provenance()
    ));
}

fn run_found<P: PeerVmm>(
    peer: &P,
    bin: &Path,
    compared: &[Compared],
    scratch: &Path,
    runs: usize,
    rows: &mut Vec<PeerRow>,
) {
    for (i, c) in compared.iter().enumerate() {
        let work = scratch.join(format!("{}-{i}", peer.name()));
        let figures = std::fs::create_dir_all(&work)
            .with_context(|| format!("creating {}", work.display()))
            .and_then(|()| measure(peer, bin, &c.guest, &work, runs));
        let _ = std::fs::remove_dir_all(&work);
        rows.push(PeerRow {
            vmm: peer.name(),
            mem_mib: c.guest.mem_mib,
            load: c.guest.load,
            label: format!("{} {}", peer.name(), c.guest.label),
            figures,
            dormouse: c.dormouse,
        });
    }
}

fn measure<P: PeerVmm>(
    peer: &P,
    bin: &Path,
    guest: &PeerGuest,
    work: &Path,
    runs: usize,
) -> anyhow::Result<PeerFigures> {
    let booting = Instant::now();
    let mut vm = peer.boot(bin, guest, work).context("boot")?;
    let boot = booting.elapsed();
    if let Some(linux) = &guest.linux {
        std::thread::sleep(linux.settle);
    }
    let mut pauses = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        vm.pause().context("pause")?;
        pauses.push(t.elapsed());
        vm.resume().context("resume")?;
    }
    let snapshot_runs = runs.clamp(1, MAX_SNAPSHOT_RUNS);
    let mut snapshots = Vec::with_capacity(snapshot_runs);
    let mut kept: Option<PathBuf> = None;
    for i in 0..snapshot_runs {
        let dir = work.join(format!("snap-{i}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Every sample starts with the page cache written back (as dormouse's rows do): a
        // previous sample's gigabytes still being flushed would throttle this one's writes.
        crate::page_cache::flush_file_system(work)?;
        vm.pause().context("pause")?;
        let t = Instant::now();
        vm.snapshot(&dir).context("snapshot")?;
        snapshots.push(t.elapsed());
        vm.resume().context("resume after snapshot")?;
        if let Some(old) = kept.replace(dir) {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    drop(vm);
    let snap = kept.context("no snapshot taken")?;
    let first_snapshot = *snapshots.first().context("no snapshot taken")?;
    let memory_path = peer.memory_file(&snap);
    let memory = std::fs::metadata(&memory_path)
        .with_context(|| format!("the memory file {}", memory_path.display()))?;

    // A first restore warms the page cache and the binary, as for dormouse.
    drop(peer.restore(bin, guest, &snap, work).context("restore")?);
    let restore_runs = runs.clamp(1, MAX_RESTORE_RUNS);
    let mut restores = Vec::with_capacity(restore_runs);
    let mut rss_kib = 0;
    for i in 0..restore_runs {
        let t = Instant::now();
        let restored = peer.restore(bin, guest, &snap, work).context("restore")?;
        restores.push(t.elapsed());
        if i + 1 == restore_runs {
            rss_kib = process::settled_rss_kib(restored.pid())?;
        }
    }
    Ok(PeerFigures {
        boot,
        pause: stats(pauses).context("no pause samples")?,
        snapshot: stats(snapshots).context("no snapshot samples")?,
        first_snapshot,
        apparent: memory.len(),
        allocated: memory.blocks() * 512,
        restore: stats(restores).context("no restore samples")?,
        rss_kib,
    })
}

/// A table cell from an error: one line, no column separators.
fn cell_text(e: &anyhow::Error) -> String {
    format!("{e:#}").replace(['|', '\n', '\r'], " ")
}

/// "12.5×" = the peer's figure is 12.5 times dormouse's.
fn ratio(peer: f64, dormouse: f64) -> String {
    if dormouse > 0.0 && peer.is_finite() {
        format!("{:.1}×", peer / dormouse)
    } else {
        "-".to_string()
    }
}

fn print_tables(rows: &[PeerRow], runs: usize) {
    println!(
        "| peer VMM, same guest (medians: pause of {runs} runs, snapshot of {}, restore of \
         {}) | process start → guest ready (one boot) | pause | snapshot create (first) \
         | memory file apparent / allocated | restore in VMM | process start → vCPUs running \
         | RSS after restore |",
        runs.clamp(1, MAX_SNAPSHOT_RUNS),
        runs.clamp(1, MAX_RESTORE_RUNS)
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        match &r.figures {
            Ok(f) => println!(
                "| {} | {} | {} | {} ({}) | {} / {} | n/a | {} | {} |",
                r.label,
                ms(f.boot),
                ms(f.pause.median),
                ms(f.snapshot.median),
                ms(f.first_snapshot),
                bytes(f.apparent),
                bytes(f.allocated),
                ms(f.restore.median),
                kib(f.rss_kib),
            ),
            Err(e) => println!("| {} | failed: {} | | | | | | |", r.label, cell_text(e)),
        }
    }
    println!();
    println!(
        "| dormouse vs peer (peer ÷ dormouse: above 1 means dormouse is faster or smaller) \
         | restore: process start → vCPUs running | snapshot create | memory file allocated \
         | RSS after restore |"
    );
    println!("|---|---|---|---|---|");
    for r in rows {
        let d = &r.dormouse;
        match &r.figures {
            Ok(f) => println!(
                "| {} | {} | {} | {} | {} |",
                r.label,
                ratio(f.restore.median.as_secs_f64(), d.restore.as_secs_f64()),
                ratio(f.snapshot.median.as_secs_f64(), d.snapshot.as_secs_f64()),
                ratio(f.allocated as f64, d.allocated as f64),
                ratio(f.rss_kib as f64, d.rss_kib as f64),
            ),
            Err(_) => println!("| {} | - | - | - | - |", r.label),
        }
    }
}

/// A peer VMM found on PATH, for the suites that only boot (`bench boot`).
pub(crate) enum FoundPeer {
    Qemu(PathBuf),
    Firecracker(PathBuf),
    CloudHypervisor(PathBuf),
}

impl FoundPeer {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            FoundPeer::Qemu(_) => qemu::Qemu.name(),
            FoundPeer::Firecracker(_) => firecracker::Firecracker.name(),
            FoundPeer::CloudHypervisor(_) => cloud_hypervisor::CloudHypervisor.name(),
        }
    }

    /// Process start → `guest`'s ready line; the VM is killed afterwards.
    pub(crate) fn boot_time(&self, guest: &PeerGuest, work: &Path) -> anyhow::Result<Duration> {
        match self {
            FoundPeer::Qemu(bin) => time_boot(&qemu::Qemu, bin, guest, work),
            FoundPeer::Firecracker(bin) => time_boot(&firecracker::Firecracker, bin, guest, work),
            FoundPeer::CloudHypervisor(bin) => {
                time_boot(&cloud_hypervisor::CloudHypervisor, bin, guest, work)
            }
        }
    }
}

/// The peers on PATH, unless `mode` is `None`.
pub(crate) fn boot_peers_found(mode: PeerMode) -> Vec<FoundPeer> {
    if mode == PeerMode::None {
        return Vec::new();
    }
    let mut found = Vec::new();
    if let Some(bin) = find_on_path(qemu::Qemu.program()) {
        found.push(FoundPeer::Qemu(bin));
    }
    if let Some(bin) = find_on_path(firecracker::Firecracker.program()) {
        found.push(FoundPeer::Firecracker(bin));
    }
    if let Some(bin) = find_on_path(cloud_hypervisor::CloudHypervisor.program()) {
        found.push(FoundPeer::CloudHypervisor(bin));
    }
    found
}

/// A line per peer: where it was found and whether it ran, or that it was not found.
pub(crate) fn boot_peer_lines(mode: PeerMode) -> Vec<String> {
    let line = |program: &str, provenance: &str| match find_on_path(program) {
        None => format!("{program}: not found ({provenance})"),
        Some(bin) if mode == PeerMode::None => {
            format!(
                "{program}: found at {}, not run (--peers none)",
                bin.display()
            )
        }
        Some(bin) => format!(
            "{program}: found at {}, run above ({provenance})",
            bin.display()
        ),
    };
    vec![
        line(qemu::Qemu.program(), qemu::Qemu.provenance()),
        line(
            firecracker::Firecracker.program(),
            firecracker::Firecracker.provenance(),
        ),
        line(
            cloud_hypervisor::CloudHypervisor.program(),
            cloud_hypervisor::CloudHypervisor.provenance(),
        ),
    ]
}

/// Times one boot of `guest` by a peer: process start → ready line (the VM is then killed).
fn time_boot<P: PeerVmm>(
    peer: &P,
    bin: &Path,
    guest: &PeerGuest,
    work: &Path,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let vm = peer.boot(bin, guest, work)?;
    let took = started.elapsed();
    drop(vm);
    Ok(took)
}

pub(crate) fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_read_as_peer_over_dormouse() {
        assert_eq!(ratio(10.0, 2.0), "5.0×");
        assert_eq!(ratio(1.0, 4.0), "0.2×");
        assert_eq!(ratio(1.0, 0.0), "-");
    }

    #[test]
    fn error_cells_stay_in_their_column() {
        let e = anyhow::anyhow!("a | b\nc").context("boot");
        assert_eq!(cell_text(&e), "boot: a   b c");
    }

    #[test]
    fn every_peer_is_named() {
        let programs = [
            qemu::Qemu.program(),
            firecracker::Firecracker.program(),
            cloud_hypervisor::CloudHypervisor.program(),
        ];
        assert_eq!(
            programs,
            ["qemu-system-x86_64", "firecracker", "cloud-hypervisor"]
        );
        assert_eq!(dormouse_fc::DormouseFcApi.name(), "dormouse-fc-api");
        assert_eq!(
            dormouse_fc::DormouseFcApi.memory_file(Path::new("/s")),
            firecracker::Firecracker.memory_file(Path::new("/s"))
        );
        assert_eq!(
            firecracker::Firecracker.provenance(),
            "runner verified against Firecracker v1.16.1 (binaries in ../shared/peers/bin)"
        );
        assert_eq!(
            cloud_hypervisor::CloudHypervisor.provenance(),
            "runner verified against Cloud Hypervisor v53 (binaries in ../shared/peers/bin)"
        );
    }
}
