//! `dormouse bench snapshot`: what pausing, snapshotting and restoring cost, per guest.
//!
//! Guests: the tiny test guest (`vmm::tiny_guest`) at each size, idle and with every page written
//! (`TouchAll`), and with `--kernel` a Linux guest at each size. Per guest, in separate
//! `dormouse` processes driven like a user would:
//! - boot (`dormouse run --api-sock`), wait until the guest is ready;
//! - pause: round trip of `PUT /v1/vm/pause` on the control socket (median of `runs`);
//! - snapshot create: round trip of `PUT /v1/vm/snapshot` on the paused VM (median of a few runs,
//!   and the first one, which also probes the host's MSR list and turns on dirty logging);
//! - the memory file's apparent and allocated size;
//! - restore: `dormouse restore` in a fresh process until it logs `RESTORED_MARKER` (vCPUs
//!   running): the time the VMM spent in `Vm::restore` and the time from process start
//!   (median of `runs`), and the process's RSS once restored;
//! - clones: `clones` restored processes at once vs one: their summed RSS and PSS.
//! - tiny guests with anonymous RAM, in this process (`super::warm_shell`): a fresh
//!   `Vm::restore` against a restore into a pre-built VM shell (the sandbox library's warm
//!   pool), the shell's build time (the pool's refill), and what a ready shell costs idle.
//!
//! The tiny guests also run with file-backed RAM (`run --mem-dir`, rows "tiny (--mem-dir) …",
//! the memory directory on the snapshots' file system): their first full snapshot links the
//! memory file instead of copying it, so every snapshot sample there is a fresh VM's first. A
//! table puts both modes side by side with the time each took to start and touch its memory.
//!
//! Peer VMMs (QEMU, Firecracker, Cloud Hypervisor) found on PATH then run the same tiny guest
//! images through the same steps (see `super::peers`), with a ratios table.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use vmm::tiny_guest::{self, TinyGuestEnd};
use vmm_api::client::ApiClient;

use super::peers::process::drain_console;
use super::peers::{self, Compared, DormouseFigures, LinuxBoot, PeerGuest, PeerMode};
use crate::page_cache::flush_file_system;
use crate::plot;
use crate::report::{bytes, kib, ms, stats, Stats};
use crate::warm_shell;
use crate::BENCH_JAIL_ID;
use vmm::vm::RESTORED_MARKER;

/// What to measure.
pub struct SnapshotBench<'a> {
    pub runs: usize,
    pub clones: usize,
    pub sizes_mib: &'a [u64],
    pub kernel: Option<&'a Path>,
    pub initrd: Option<&'a Path>,
    pub peers: PeerMode,
    /// Draw the comparison into this SVG file.
    pub plot: Option<&'a Path>,
}

/// Writing 2 GiB one byte per page takes ~1–2 s where guest ring 0 is emulated; a Linux boot up
/// to a minute on a loaded emulating host.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// After "Run /init", let the Linux guest's init settle before measuring.
const LINUX_SETTLE: Duration = Duration::from_secs(3);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
/// A snapshot of a touched 2 GiB guest writes 2 GiB: a few runs give a median.
const MAX_SNAPSHOT_RUNS: usize = 5;
const MIB: u64 = 1 << 20;

// Targets (issue #5), printed next to the figures.
const TARGET_RESTORE: Duration = Duration::from_millis(3);
const TARGET_IDLE_SNAPSHOT: Duration = Duration::from_millis(10);
const TARGET_IDLE_ALLOCATED: u64 = MIB;
const TARGET_TOUCHED_SNAPSHOT: Duration = Duration::from_millis(500);
const TARGET_RSS_BASE_KIB: u64 = 5 * 1024;

pub(crate) struct Case {
    pub(crate) label: String,
    pub(crate) kernel: PathBuf,
    pub(crate) initrd: Option<PathBuf>,
    pub(crate) mem_mib: u64,
    /// Console text that says the guest is ready.
    pub(crate) ready: &'static str,
    pub(crate) settle: Duration,
    /// A tiny guest (the RSS and snapshot targets apply).
    pub(crate) tiny: bool,
    pub(crate) touched: bool,
    /// Guest RAM in a file in the scratch directory (`run --mem-dir`).
    pub(crate) mem_dir: bool,
}

#[derive(Clone, Copy, Default)]
struct Mem {
    rss_kib: u64,
    pss_kib: u64,
}

struct Row {
    case_label: String,
    mem_mib: u64,
    tiny: bool,
    touched: bool,
    mem_dir: bool,
    /// Process start → the guest's ready line (all memory written, for touched guests).
    ready: Stats,
    /// How the last snapshot's memory file was made ("linked" or "written").
    memory_kind: String,
    pause: Stats,
    snapshot: Stats,
    first_snapshot: Duration,
    apparent: u64,
    allocated: u64,
    restore_vmm: Stats,
    restore_process: Stats,
    one: Mem,
    clones: Mem,
    /// The first tiny idle guest only: restores with --seccomp off and jailed.
    variants: Option<RestoreVariants>,
    /// Tiny guests with anonymous RAM: restores into a warm VM shell in this process.
    warm: Option<warm_shell::WarmFigures>,
    /// Tiny idle guests with anonymous RAM: what a ready shell of their shape costs.
    idle_shell: Option<warm_shell::IdleCost>,
}

/// Process start → vCPUs running for one snapshot restored three ways, interleaved.
struct RestoreVariants {
    label: String,
    plain: Stats,
    seccomp_off: Stats,
    /// `plain` over `seccomp_off`, pair by pair (None with fewer than 6 runs).
    seccomp_cost: Option<crate::report::PairedCost>,
    /// None when not root.
    jailed: Option<Stats>,
}

#[derive(Clone, Copy)]
enum RestoreVariant<'a> {
    Plain,
    SeccompOff,
    /// `dormouse jail --id ID --chroot-base BASE -- restore …`.
    Jailed {
        base: &'a Path,
        id: &'a str,
    },
}

/// Medians for the chart and for later comparisons (the live table).
pub(crate) struct SnapshotSeries {
    pub(crate) dormouse: Vec<plot::Series>,
    pub(crate) peers: Vec<plot::Series>,
}

/// Runs the benchmark and prints its tables.
pub(crate) fn bench_snapshot(opts: &SnapshotBench<'_>) -> anyhow::Result<SnapshotSeries> {
    if opts.sizes_mib.is_empty() {
        bail!("--sizes-mib needs at least one size");
    }
    let runs = opts.runs.max(1);
    let clones = opts.clones.max(1);
    let dir = scratch_dir()?;
    let result = (|| {
        let cases = cases(opts, &dir)?;
        let mut rows = Vec::with_capacity(cases.len());
        for case in &cases {
            let variants = !rows.iter().any(|r: &Row| r.variants.is_some())
                && case.tiny
                && !case.touched
                && !case.mem_dir;
            let row = measure(case, &dir, runs, clones, variants)
                .with_context(|| format!("measuring {}", case.label))?;
            rows.push(row);
        }
        print_tables(&rows, runs, clones, opts.kernel.is_some());
        print_variants(&rows, runs);
        print_warm(&rows, runs);
        let compared = peer_cases(&cases, &rows)?;
        let peer_series = peers::bench_peers(opts.peers, &compared, &dir, runs);
        let dormouse = dormouse_series(&rows);
        if let Some(path) = opts.plot {
            let mut series = dormouse.clone();
            series.extend(peer_series.iter().cloned());
            let title = format!("dormouse bench snapshot --runs {runs}: medians of one run");
            plot::write_svg(path, &title, &series)?;
            println!("chart: {}", path.display());
        }
        Ok(SnapshotSeries {
            dormouse,
            peers: peer_series,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A snapshot in `out` of the tiny guest with `mem_mib` MiB, every page written (its kernel
/// image goes to `dir`): booted, paused, snapshotted, killed.
pub(crate) fn touched_tiny_snapshot(dir: &Path, mem_mib: u64, out: &Path) -> anyhow::Result<()> {
    let kernel = dir.join(format!("tiny-touch-{mem_mib}.elf"));
    tiny_guest::write_portable_to(
        &kernel,
        TinyGuestEnd::TouchAll {
            mem_bytes: mem_mib * MIB,
        },
    )?;
    let case = Case {
        label: format!("tiny {} all touched", size_label(mem_mib)),
        kernel,
        initrd: None,
        mem_mib,
        ready: "dormouse-tiny-guest: touched\n",
        settle: Duration::ZERO,
        tiny: true,
        touched: true,
        mem_dir: false,
    };
    let vm = boot(&case, dir)?;
    vm.client.pause().context("pause")?;
    vm.client.snapshot(out, false, false).context("snapshot")?;
    Ok(())
}

pub(crate) fn scratch_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("dormouse-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn cases(opts: &SnapshotBench<'_>, dir: &Path) -> anyhow::Result<Vec<Case>> {
    let idle = dir.join("tiny-idle.elf");
    // The portable image (PVH entry too): the peers run the very same files.
    tiny_guest::write_portable_to(&idle, TinyGuestEnd::Idle)?;
    let mut cases = Vec::new();
    for &mem_mib in opts.sizes_mib {
        if mem_mib == 0 || mem_mib.saturating_mul(MIB) > tiny_guest::TOUCH_LIMIT {
            bail!(
                "--sizes-mib: {mem_mib} MiB is outside 1..={} MiB",
                tiny_guest::TOUCH_LIMIT / MIB
            );
        }
        let touch = dir.join(format!("tiny-touch-{mem_mib}.elf"));
        tiny_guest::write_portable_to(
            &touch,
            TinyGuestEnd::TouchAll {
                mem_bytes: mem_mib * MIB,
            },
        )?;
        cases.push(Case {
            label: format!("tiny {} idle", size_label(mem_mib)),
            kernel: idle.clone(),
            initrd: None,
            mem_mib,
            ready: "dormouse-tiny-guest\n",
            settle: Duration::ZERO,
            tiny: true,
            touched: false,
            mem_dir: false,
        });
        cases.push(Case {
            label: format!("tiny {} all touched", size_label(mem_mib)),
            kernel: touch,
            initrd: None,
            mem_mib,
            ready: "dormouse-tiny-guest: touched\n",
            settle: Duration::ZERO,
            tiny: true,
            touched: true,
            mem_dir: false,
        });
    }
    // The same tiny guests with file-backed RAM, after the anonymous ones.
    for &mem_mib in opts.sizes_mib {
        let file_backed: Vec<Case> = cases
            .iter()
            .filter(|c| c.tiny && c.mem_mib == mem_mib)
            .map(|c| Case {
                label: c.label.replacen("tiny ", "tiny (--mem-dir) ", 1),
                kernel: c.kernel.clone(),
                initrd: None,
                mem_mib,
                ready: c.ready,
                settle: c.settle,
                tiny: true,
                touched: c.touched,
                mem_dir: true,
            })
            .collect();
        cases.extend(file_backed);
    }
    if let Some(kernel) = opts.kernel {
        for &mem_mib in opts.sizes_mib {
            cases.push(Case {
                label: format!("Linux {}", size_label(mem_mib)),
                kernel: kernel.to_path_buf(),
                initrd: opts.initrd.map(Path::to_path_buf),
                mem_mib,
                ready: "Run /init",
                settle: LINUX_SETTLE,
                tiny: false,
                touched: false,
                mem_dir: false,
            });
        }
    }
    Ok(cases)
}

pub(crate) fn size_label(mem_mib: u64) -> String {
    if mem_mib >= 1024 && mem_mib.is_multiple_of(1024) {
        format!("{} GiB", mem_mib / 1024)
    } else {
        format!("{mem_mib} MiB")
    }
}

fn dormouse() -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("locating the dormouse binary")?;
    Ok(Command::new(exe))
}

/// A child process killed (and reaped) when dropped.
pub(crate) struct Reaped(pub(crate) Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A booted VM with its control socket.
pub(crate) struct Booted {
    _child: Reaped,
    pub(crate) client: ApiClient,
    /// Process start → the guest's ready line.
    pub(crate) ready_after: Duration,
}

pub(crate) fn boot(case: &Case, dir: &Path) -> anyhow::Result<Booted> {
    let sock = dir.join("vm.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = dormouse()?;
    cmd.env_remove("DORMOUSE_LOG")
        .args(["--log-level", "warn", "run", "--kernel"])
        .arg(&case.kernel)
        .args(["--mem-mib", &case.mem_mib.to_string(), "--api-sock"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(initrd) = &case.initrd {
        cmd.arg("--initrd").arg(initrd);
    }
    if case.mem_dir {
        // Next to the snapshots: the same file system, so snapshots link the memory file.
        let mem_dir = dir.join("mem");
        std::fs::create_dir_all(&mem_dir)
            .with_context(|| format!("creating {}", mem_dir.display()))?;
        cmd.arg("--mem-dir").arg(mem_dir);
    }
    let started = Instant::now();
    let mut child = Reaped(cmd.spawn().context("spawning dormouse run")?);
    let out = child.0.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    let marker = case.ready.as_bytes().to_vec();
    std::thread::spawn(move || drain_console(out, &marker, tx));
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(tail)) => bail!(
            "the guest ended before printing {:?}; its console ended with {:?}",
            case.ready,
            String::from_utf8_lossy(&tail)
        ),
        Err(_) => bail!(
            "no {:?} on the console within {READY_TIMEOUT:?}",
            case.ready
        ),
    }
    let ready_after = started.elapsed();
    std::thread::sleep(case.settle);
    let client = ApiClient::new(&sock).with_timeout(Duration::from_secs(600));
    // The console can be ready a moment before the control socket listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = client.info() {
        if Instant::now() > deadline {
            return Err(e).context("the control API did not answer");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(Booted {
        _child: child,
        client,
        ready_after,
    })
}

fn measure(
    case: &Case,
    dir: &Path,
    runs: usize,
    clones: usize,
    with_variants: bool,
) -> anyhow::Result<Row> {
    let mut vm = boot(case, dir)?;
    let mut ready = vec![vm.ready_after];
    let mut pauses = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        vm.client.pause().context("pause")?;
        pauses.push(t.elapsed());
        vm.client.resume().context("resume")?;
    }
    let snapshot_runs = runs.min(MAX_SNAPSHOT_RUNS);
    let mut snapshots = Vec::with_capacity(snapshot_runs);
    let mut kept: Option<PathBuf> = None;
    let mut memory_kind = String::new();
    for i in 0..snapshot_runs {
        if case.mem_dir && i > 0 {
            // Only a booted VM's first full snapshot links its memory file.
            drop(vm);
            vm = boot(case, dir)?;
            ready.push(vm.ready_after);
        }
        let snap = dir.join(format!("snap-{i}"));
        // Every sample starts with the page cache written back: a previous sample's gigabytes
        // still being flushed would throttle this one's writes (the peers' rows do the same).
        flush_file_system(dir)?;
        vm.client.pause().context("pause")?;
        let t = Instant::now();
        let info = vm
            .client
            .snapshot(&snap, false, false)
            .context("snapshot")?;
        snapshots.push(t.elapsed());
        memory_kind = info.memory;
        vm.client.resume().context("resume")?;
        if let Some(old) = kept.replace(snap) {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    drop(vm);
    let snap = kept.context("no snapshot taken")?;
    let first_snapshot = *snapshots.first().context("no snapshot taken")?;
    let memory = std::fs::metadata(snap.join("memory.bin")).context("the memory file")?;

    // A wake comes long after its hibernate: restores are timed once the snapshot's writeback
    // is done, not while kernel threads flush gigabytes on the same cores.
    flush_file_system(&snap)?;

    let mut vmm_times = Vec::with_capacity(runs);
    let mut process_times = Vec::with_capacity(runs);
    restore(&snap)?; // warm the page cache and the binary
    let mut one = Mem::default();
    for i in 0..runs {
        let r = restore(&snap)?;
        vmm_times.push(r.in_vmm);
        process_times.push(r.to_running);
        if i + 1 == runs {
            one = settled_mem(r.child.0.id());
        }
    }
    let mut many = Vec::with_capacity(clones);
    for _ in 0..clones {
        many.push(restore(&snap)?);
    }
    std::thread::sleep(Duration::from_millis(100));
    let clones_mem = many.iter().fold(Mem::default(), |acc, r| {
        let m = mem_of(r.child.0.id());
        Mem {
            rss_kib: acc.rss_kib + m.rss_kib,
            pss_kib: acc.pss_kib + m.pss_kib,
        }
    });
    drop(many);
    let variants = if with_variants {
        Some(restore_variants(&case.label, &snap, dir, runs)?)
    } else {
        None
    };
    let in_process = case.tiny && !case.mem_dir;
    let warm = if in_process {
        Some(warm_shell::measure(&snap, runs).context("restores into a warm shell")?)
    } else {
        None
    };
    let idle_shell = if in_process && !case.touched {
        Some(warm_shell::idle_cost(&snap).context("idle shells")?)
    } else {
        None
    };
    let _ = std::fs::remove_dir_all(&snap);
    Ok(Row {
        case_label: case.label.clone(),
        mem_mib: case.mem_mib,
        tiny: case.tiny,
        touched: case.touched,
        mem_dir: case.mem_dir,
        ready: stats(ready).context("no boot samples")?,
        memory_kind,
        pause: stats(pauses).context("no pause samples")?,
        snapshot: stats(snapshots).context("no snapshot samples")?,
        first_snapshot,
        apparent: memory.len(),
        allocated: memory.blocks() * 512,
        restore_vmm: stats(vmm_times).context("no restore samples")?,
        restore_process: stats(process_times).context("no restore samples")?,
        one,
        clones: clones_mem,
        variants,
        warm,
        idle_shell,
    })
}

/// Restores `snap` as it is, with `--seccomp off` and (as root) jailed, interleaved: what the
/// filters and the jail add to process start → vCPUs running.
fn restore_variants(
    label: &str,
    snap: &Path,
    dir: &Path,
    runs: usize,
) -> anyhow::Result<RestoreVariants> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let base = dir.join("jails");
    if root {
        // The jailed VMM runs as BENCH_JAIL_ID and must read the snapshot.
        for path in std::iter::once(snap.to_path_buf())
            .chain(std::fs::read_dir(snap)?.flatten().map(|e| e.path()))
        {
            std::os::unix::fs::lchown(&path, Some(BENCH_JAIL_ID), Some(BENCH_JAIL_ID))
                .with_context(|| format!("chown {}", path.display()))?;
        }
    }
    let (mut plain, mut off, mut jailed) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        // Alternating which of the pair runs first (see `bench_boot`).
        if i.is_multiple_of(2) {
            plain.push(restore_as(snap, RestoreVariant::Plain)?.to_running);
            off.push(restore_as(snap, RestoreVariant::SeccompOff)?.to_running);
        } else {
            off.push(restore_as(snap, RestoreVariant::SeccompOff)?.to_running);
            plain.push(restore_as(snap, RestoreVariant::Plain)?.to_running);
        }
        if root {
            let id = format!("bench-restore-{}-{i}", std::process::id());
            let r = restore_as(
                snap,
                RestoreVariant::Jailed {
                    base: &base,
                    id: &id,
                },
            )?;
            jailed.push(r.to_running);
            // The supervisor passes SIGTERM on and cleans up (a SIGKILL would leave the jail).
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(r.child.0.id() as libc::pid_t, libc::SIGTERM) };
            let mut r = r;
            let _ = r.child.0.wait();
        }
    }
    Ok(RestoreVariants {
        label: label.to_string(),
        seccomp_cost: crate::report::paired_cost(&plain, &off),
        plain: stats(plain).context("no samples")?,
        seccomp_off: stats(off).context("no samples")?,
        jailed: stats(jailed),
    })
}

fn print_variants(rows: &[Row], runs: usize) {
    let Some(v) = rows.iter().find_map(|r| r.variants.as_ref()) else {
        return;
    };
    println!();
    println!("| restore of {} ({runs} runs, interleaved) | process start → vCPUs running: min | median |", v.label);
    println!("|---|---|---|");
    println!(
        "| as is (seccomp enforcing) | {} | {} |",
        ms(v.plain.min),
        ms(v.plain.median)
    );
    println!(
        "| --seccomp off | {} | {} |",
        ms(v.seccomp_off.min),
        ms(v.seccomp_off.median)
    );
    if let Some(cost) = &v.seccomp_cost {
        println!(
            "| seccomp's cost: median of the paired differences [95 % interval] | {} | |",
            crate::report::paired(cost)
        );
    }
    match &v.jailed {
        Some(j) => println!(
            "| jailed (`dormouse jail … -- restore`) | {} | {} |",
            ms(j.min),
            ms(j.median)
        ),
        None => println!("| jailed | skipped (needs root) | |"),
    }
}

/// The warm-shell tables: a row per guest measured in-process, then the idle cost per size.
fn print_warm(rows: &[Row], runs: usize) {
    let warm: Vec<(&str, &warm_shell::WarmFigures)> = rows
        .iter()
        .filter_map(|r| Some((r.case_label.as_str(), r.warm.as_ref()?)))
        .collect();
    if warm.is_empty() {
        return;
    }
    println!();
    println!(
        "| restore in this process (medians of {runs} runs, interleaved; seccomp enforcing, no \
         dirty log, as the sandbox library) | fresh Vm::restore → vCPUs running | restore into a \
         warm shell → vCPUs running | warm ≤ {} | shell build (pool refill) |",
        ms(warm_shell::TARGET_WARM_RESTORE)
    );
    println!("|---|---|---|---|---|");
    for (label, f) in warm {
        println!(
            "| warm shell: {label} | {} | {} | {} | {} |",
            ms(f.fresh.median),
            ms(f.warm.median),
            verdict(f.warm.median <= warm_shell::TARGET_WARM_RESTORE),
            ms(f.build.median),
        );
    }
    let idle: Vec<(String, warm_shell::IdleCost)> = rows
        .iter()
        .filter_map(|r| Some((size_label(r.mem_mib), r.idle_shell?)))
        .collect();
    if idle.is_empty() {
        return;
    }
    println!();
    println!(
        "| a ready shell's idle cost (per shell, {} built) | RSS of this process | kernel memory \
         (Slab + PageTables + KernelStack) | MemAvailable drop |",
        warm_shell::IDLE_SHELLS
    );
    println!("|---|---|---|---|");
    for (label, c) in idle {
        println!(
            "| idle shells: {label} | {} | {} | {} |",
            kib(c.rss_kib),
            kib(c.kernel_kib),
            kib(c.mem_available_kib),
        );
    }
}

pub(crate) struct Restored {
    pub(crate) child: Reaped,
    /// Time spent in `Vm::restore`, as the VMM logged it.
    pub(crate) in_vmm: Duration,
    /// Process start → the VMM's "vCPUs running" line.
    pub(crate) to_running: Duration,
}

/// `dormouse restore` of `snap` in a new process, until its vCPUs run.
fn restore(snap: &Path) -> anyhow::Result<Restored> {
    restore_as(snap, RestoreVariant::Plain)
}

fn restore_as(snap: &Path, variant: RestoreVariant<'_>) -> anyhow::Result<Restored> {
    let mut cmd = dormouse()?;
    cmd.env("DORMOUSE_LOG", "info");
    if let RestoreVariant::Jailed { base, id } = variant {
        crate::jail_args(&mut cmd, base, id);
    }
    cmd.args(["restore", "--console", "null", "--dir"])
        .arg(snap);
    if matches!(variant, RestoreVariant::SeccompOff) {
        cmd.args(["--seccomp", "off"]);
    }
    until_restored(cmd)
}

/// Spawns `cmd` (a `dormouse restore …`) with `DORMOUSE_LOG=info` and waits until it logs
/// running vCPUs.
pub(crate) fn until_restored(mut cmd: Command) -> anyhow::Result<Restored> {
    cmd.env("DORMOUSE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = Reaped(cmd.spawn().context("spawning dormouse restore")?);
    let err = child.0.stderr.take().context("no stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        let mut log = Vec::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if !sent && line.contains(RESTORED_MARKER) {
                let _ = tx.send(Ok((start.elapsed(), line)));
                sent = true;
            } else if !sent && log.len() < 20 {
                log.push(line);
            }
        }
        if !sent {
            let _ = tx.send(Err(log.join("\n")));
        }
    });
    let (to_running, line) = match rx.recv_timeout(RESTORE_TIMEOUT) {
        Ok(Ok(found)) => found,
        Ok(Err(log)) => bail!("dormouse restore ended without restoring:\n{log}"),
        Err(_) => bail!("dormouse restore did not report running vCPUs within {RESTORE_TIMEOUT:?}"),
    };
    let in_vmm = parse_restore_ms(&line)
        .with_context(|| format!("cannot read the restore time in {line:?}"))?;
    Ok(Restored {
        child,
        in_vmm,
        to_running,
    })
}

/// The duration in "… vCPUs running in 0.812 ms".
fn parse_restore_ms(line: &str) -> Option<Duration> {
    let rest = line.split(RESTORED_MARKER).nth(1)?.trim_start();
    let number: String = rest
        .strip_prefix("in ")?
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let ms: f64 = number.parse().ok()?;
    (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1e3))
}

/// RSS and PSS once the process has settled for a moment.
fn settled_mem(pid: u32) -> Mem {
    std::thread::sleep(Duration::from_millis(100));
    mem_of(pid)
}

fn mem_of(pid: u32) -> Mem {
    Mem {
        rss_kib: proc_kib(&format!("/proc/{pid}/status"), "VmRSS:").unwrap_or(0),
        pss_kib: proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:").unwrap_or(0),
    }
}

fn proc_kib(file: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn print_tables(rows: &[Row], runs: usize, clones: usize, linux: bool) {
    let snapshot_runs = runs.min(MAX_SNAPSHOT_RUNS);
    println!(
        "| snapshot figure (medians: pause and restore of {runs} runs, snapshot of \
         {snapshot_runs}) | pause | snapshot create (first) | memory file apparent / allocated \
         | restore in VMM | process start → vCPUs running | RSS after restore |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} ({}) | {} / {} | {} | {} | {} |",
            r.case_label,
            ms(r.pause.median),
            ms(r.snapshot.median),
            ms(r.first_snapshot),
            bytes(r.apparent),
            bytes(r.allocated),
            ms(r.restore_vmm.median),
            ms(r.restore_process.median),
            kib(r.one.rss_kib),
        );
    }
    if !linux {
        println!("| Linux guest | skipped (pass --kernel and --initrd) | | | | | |");
    }
    if crate::page_cache::host_balloon_reports_free_pages(Path::new("/sys")) {
        println!(
            "Host note: this machine is itself a guest whose balloon reports free pages to its \
             host; page-cache pages from reported blocks fault in there again, so snapshot \
             creates of touched guests (dormouse's and the peers') can run several times slower \
             in one run than in the next. Compare rows of the same run, and several runs."
        );
    }

    println!();
    println!("| {clones} clones (restored from one snapshot, all running) | one: RSS / PSS | {clones}: Σ RSS / Σ PSS | PSS each clone adds | vs {clones} full copies of guest memory |");
    println!("|---|---|---|---|---|");
    for r in rows {
        let extra_per_clone = if clones > 1 {
            kib(r.clones.pss_kib.saturating_sub(r.one.pss_kib) / (clones as u64 - 1))
        } else {
            "-".to_string()
        };
        let full_copies_kib = clones as u64 * r.mem_mib * 1024;
        println!(
            "| {} | {} / {} | {} / {} | {} | {:.2} % |",
            r.case_label,
            kib(r.one.rss_kib),
            kib(r.one.pss_kib),
            kib(r.clones.rss_kib),
            kib(r.clones.pss_kib),
            extra_per_clone,
            100.0 * r.clones.pss_kib as f64 / full_copies_kib.max(1) as f64,
        );
    }

    print_ram_modes(rows);

    println!();
    println!("| target (issue #5) | measured | verdict |");
    println!("|---|---|---|");
    if let Some(worst) = rows.iter().max_by_key(|r| r.restore_vmm.median) {
        println!(
            "| restore ≤ {} median at any size (in VMM) | {} ({}) | {} |",
            ms(TARGET_RESTORE),
            ms(worst.restore_vmm.median),
            worst.case_label,
            verdict(worst.restore_vmm.median <= TARGET_RESTORE)
        );
    }
    // Judged on the faster RAM mode, named; the anonymous-RAM figure is printed next to it.
    for touched in [false, true] {
        let candidates = || {
            rows.iter()
                .filter(move |r| r.tiny && r.mem_mib == 2048 && r.touched == touched)
        };
        let Some(best) = candidates().min_by_key(|r| r.snapshot.median) else {
            continue;
        };
        let anonymous = candidates()
            .find(|r| !r.mem_dir)
            .filter(|_| best.mem_dir)
            .map(|r| format!(" (anonymous RAM: {})", ms(r.snapshot.median)))
            .unwrap_or_default();
        if touched {
            println!(
                "| 2 GiB fully touched snapshot ≤ {} ({}) | {}{anonymous} | {} |",
                ms(TARGET_TOUCHED_SNAPSHOT),
                ram_mode(best),
                ms(best.snapshot.median),
                verdict(best.snapshot.median <= TARGET_TOUCHED_SNAPSHOT)
            );
        } else {
            println!(
                "| 2 GiB idle snapshot ≤ {} with ≤ {} allocated ({}) | {}, {} allocated{anonymous} | {} |",
                ms(TARGET_IDLE_SNAPSHOT),
                bytes(TARGET_IDLE_ALLOCATED),
                ram_mode(best),
                ms(best.snapshot.median),
                bytes(best.allocated),
                verdict(
                    best.snapshot.median <= TARGET_IDLE_SNAPSHOT
                        && best.allocated <= TARGET_IDLE_ALLOCATED
                )
            );
        }
    }
    // The restored tiny guests are halted: they touch no page after restore.
    if let Some(worst) = rows.iter().filter(|r| r.tiny).max_by_key(|r| r.one.rss_kib) {
        println!(
            "| RSS after restore ≤ {} + pages the guest touches (tiny guests touch none) | {} ({}) | {} |",
            kib(TARGET_RSS_BASE_KIB),
            kib(worst.one.rss_kib),
            worst.case_label,
            verdict(worst.one.rss_kib <= TARGET_RSS_BASE_KIB)
        );
    }
}

/// How a row's guest RAM was backed, for the targets table.
fn ram_mode(row: &Row) -> String {
    if row.mem_dir {
        format!("file-backed RAM, --mem-dir: memory.bin {}", row.memory_kind)
    } else {
        "anonymous RAM".to_string()
    }
}

/// Anonymous vs file-backed RAM for each tiny guest: what the file costs while the guest writes
/// its memory, and what it saves at snapshot time.
fn print_ram_modes(rows: &[Row]) {
    let pairs: Vec<(&Row, &Row)> = rows
        .iter()
        .filter(|r| r.tiny && !r.mem_dir)
        .filter_map(|anon| {
            let file = rows
                .iter()
                .find(|r| r.mem_dir && r.mem_mib == anon.mem_mib && r.touched == anon.touched)?;
            Some((anon, file))
        })
        .collect();
    if pairs.is_empty() {
        return;
    }
    println!();
    println!(
        "| tiny guest: anonymous vs file-backed RAM (--mem-dir, same file system as the \
         snapshot) | process start → guest ready (touched: every page written), anonymous / \
         file-backed | snapshot create, anonymous / file-backed | file-backed memory.bin |"
    );
    println!("|---|---|---|---|");
    for (anon, file) in pairs {
        println!(
            "| {} | {} / {} | {} / {} | {} |",
            anon.case_label.trim_start_matches("tiny "),
            ms(anon.ready.median),
            ms(file.ready.median),
            ms(anon.snapshot.median),
            ms(file.snapshot.median),
            file.memory_kind,
        );
    }
}

fn load_of(tiny: bool, touched: bool) -> plot::Load {
    match (tiny, touched) {
        (false, _) => plot::Load::Linux,
        (true, false) => plot::Load::Idle,
        (true, true) => plot::Load::AllTouched,
    }
}

/// Dormouse's medians for the chart: anonymous RAM as "dormouse", `--mem-dir` rows apart.
fn dormouse_series(rows: &[Row]) -> Vec<plot::Series> {
    [(false, "dormouse"), (true, "dormouse (--mem-dir)")]
        .into_iter()
        .map(|(mem_dir, vmm)| plot::Series {
            vmm: vmm.to_string(),
            points: rows
                .iter()
                .filter(|r| r.mem_dir == mem_dir)
                .map(|r| plot::Point {
                    mem_mib: r.mem_mib,
                    load: load_of(r.tiny, r.touched),
                    create: r.snapshot.median,
                    restore: r.restore_process.median,
                })
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect()
}

/// The command line `dormouse run` gives `kernel` on this host (no --cmdline): the default plus
/// the host's quirks. The peers' Linux guests get the same: on an emulating PVM host the guest
/// cannot boot without its CPU features cleared, whichever VMM runs it.
pub(crate) fn dormouse_cmdline(kernel: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut head = Vec::with_capacity(4096);
    std::fs::File::open(kernel)
        .and_then(|f| f.take(4096).read_to_end(&mut head))
        .with_context(|| format!("reading {}", kernel.display()))?;
    let guest = vmm::host::guest_kernel_kind(vmm::boot::loader::elf_first_load_vaddr(&head));
    // The vendor does not change the quirks.
    let host = vmm::host::detect(Path::new("/sys"), vmm::host::CpuVendor::Other, guest);
    Ok(vmm::vm::compose_cmdline(
        vmm::vm::DEFAULT_CMDLINE,
        &host.quirks().guest_cmdline,
        &[],
    ))
}

/// The tiny-guest and Linux cases with dormouse's figures on them, for the peers to run and
/// compare.
fn peer_cases(cases: &[Case], rows: &[Row]) -> anyhow::Result<Vec<Compared>> {
    let mut compared = Vec::new();
    // Peers are compared with dormouse's default, anonymous RAM.
    for case in cases.iter().filter(|case| !case.mem_dir) {
        let Some(row) = rows.iter().find(|r| r.case_label == case.label) else {
            continue;
        };
        let linux = if case.tiny {
            None
        } else {
            Some(LinuxBoot {
                initrd: case.initrd.clone(),
                cmdline: dormouse_cmdline(&case.kernel)?,
                settle: case.settle,
            })
        };
        compared.push(Compared {
            guest: PeerGuest {
                label: case.label.trim_start_matches("tiny ").to_string(),
                elf: case.kernel.clone(),
                linux,
                mem_mib: case.mem_mib,
                load: load_of(case.tiny, case.touched),
                ready: case.ready.as_bytes(),
            },
            dormouse: DormouseFigures {
                snapshot: row.snapshot.median,
                allocated: row.allocated,
                restore: row.restore_process.median,
                rss_kib: row.one.rss_kib,
            },
        });
    }
    Ok(compared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_time_is_read_from_the_marker_line() {
        let line = format!("\u{1b}[32m INFO\u{1b}[0m {RESTORED_MARKER} in 0.812 ms");
        assert_eq!(
            parse_restore_ms(&line),
            Some(Duration::from_secs_f64(0.000812))
        );
        assert_eq!(parse_restore_ms("something else"), None);
        assert_eq!(
            parse_restore_ms(&format!("{RESTORED_MARKER} in x ms")),
            None
        );
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(size_label(2048), "2 GiB");
        assert_eq!(size_label(256), "256 MiB");
        assert_eq!(bytes(512 * 1024), "512 KiB");
        assert_eq!(bytes(3 * MIB / 2), "1.5 MiB");
    }
}
