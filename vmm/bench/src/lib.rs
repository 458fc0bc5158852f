//! `dormouse bench`: runs the measurements and prints one table.
//!
//! `boot`: process start → first serial output and → process exit, over N runs of the tiny test
//! guest (see `vmm::tiny_guest`), the VMM's idle RSS, and (with --kernel) a Linux guest's time to
//! `Run /init`.
//!
//! `io`: virtio-blk and virtio-net datapath cost with a mock guest driver (see `io`).
//!
//! `vsock`: the userspace vsock datapath: VMM cost per packet with a mock guest driver, and with
//! `--kernel K --vsock-initrd I` (I from `deploy/build-vsock-bench-initrd.sh`) a real guest's
//! 1-byte round-trip latency and throughput each way, over the in-process `VsockHandle` and the
//! hybrid Unix socket (see `vsock`).
//!
//! `snapshot`: pause, snapshot create, memory file size, restore to running vCPUs, RSS after
//! restore and the cost of N clones, for the tiny guest (256 MiB and 2 GiB, idle and all memory
//! touched) and with `--kernel --initrd` a Linux guest (see `snapshot`).
//!
//! `sandbox`: with `--kernel K --initrd I` (or `--rootfs R`) whose init runs the guest agent,
//! the sandbox library's boot / create-from-template / fork / wake → first Exec, split into
//! host-side and guest-side time (see `sandbox`). With `--images busybox,debian,oci` (and
//! --kernel) it also prints the guest images' table: build time cold and cached, image size,
//! boot → agent ready and template create → first Exec (see `images`). Not part of `all`: it
//! needs an agent guest.
//!
//! `store`: the snapshot store's push and pull throughput (S3 on a SeaweedFS it starts, or
//! `--store-url`, and `file://`), bytes stored for a template and clones, and `restore --from`
//! against a local restore (see `store`).
//!
//! `all`: every suite but `sandbox`, one table after the other; a failing suite does not stop the
//! others, and the exit code is non-zero if any failed (their names go to stderr).

mod balloon;
mod boot_peers;
mod density;
mod exec_floor;
pub mod floor;
mod images;
mod io;
mod live;
mod page_cache;
mod peers;
mod plot;
pub mod report;
mod sandbox;
mod sandbox_memory;
mod snapshot;
mod store;
mod store_wake;
mod vsock;
mod warm_shell;
pub mod weed;

use report::ms;
pub use report::{stats, Stats};

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use vmm::tiny_guest::{self, TinyGuestEnd};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    Boot,
    Io,
    Vsock,
    Snapshot,
    Sandbox,
    Store,
    /// A guest fills and frees memory: how much goes back to the host (docs/balloon.md).
    Balloon,
    All,
}

#[derive(Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum, default_value = "boot")]
    pub suite: Suite,
    /// Runs per figure (at least 20 for medians worth reading).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// A Linux kernel for the time-to-`Run /init` row (skipped without it).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// The initrd that goes with --kernel.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// For the sandbox suite: an ext4 root filesystem whose init runs the guest agent (each
    /// sandbox gets its own copy), instead of --initrd.
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// For the sandbox suite: also measure these guest images (built with the checkout's
    /// deploy/build-rootfs.sh, see --repo), comma-separated: busybox, debian, oci.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub images: Vec<images::ImageKind>,
    /// The checkout whose deploy/ scripts --images runs.
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// Measuring time of each io row, in seconds.
    #[arg(long, default_value_t = 0.5)]
    pub io_secs: f64,
    /// Restored processes running at once for the snapshot suite's clone-cost row.
    #[arg(long, default_value_t = 10)]
    pub clones: usize,
    /// Guest sizes for the snapshot suite, in MiB (comma-separated, at most 3072).
    #[arg(long, value_delimiter = ',', default_values_t = [256u64, 2048])]
    pub sizes_mib: Vec<u64>,
    /// For the snapshot and boot suites: run the peer VMMs found on PATH (QEMU, Firecracker,
    /// Cloud Hypervisor) on the same tiny guest, or none.
    #[arg(long, value_enum, default_value = "auto")]
    pub peers: peers::PeerMode,
    /// For the snapshot suite: also draw snapshot create and restore time against guest size,
    /// one series per VMM measured, into this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// The initrd running the vsock test guest (deploy/build-vsock-bench-initrd.sh), for the
    /// real-guest vsock rows (skipped without it and --kernel).
    #[arg(long)]
    pub vsock_initrd: Option<PathBuf>,
    /// Timed 1-byte vsock round trips per host path (after a warm-up).
    #[arg(long, default_value_t = 1000)]
    pub vsock_round_trips: usize,
    /// Bytes per real-guest vsock throughput row.
    #[arg(long, default_value_t = 16 << 20)]
    pub vsock_bytes: u64,
    /// Bytes per mock-driver vsock row.
    #[arg(long, default_value_t = 64 << 20)]
    pub vsock_mock_bytes: u64,
    /// For the store suite: an S3 store (`s3://bucket/prefix`, credentials from the AWS_*
    /// environment) instead of a SeaweedFS started on 127.0.0.1; objects go below a prefix of
    /// their own, deleted at the end.
    #[arg(long)]
    pub store_url: Option<String>,
    /// balloon: MiB the guest fills and frees.
    #[arg(long, default_value_t = 1024)]
    pub fill_mib: u64,
    /// balloon: seconds after the free at which RSS is read again (free page reporting runs
    /// about 2 s after pages are freed).
    #[arg(long, default_value_t = 10)]
    pub balloon_settle_s: u64,
    /// bench sandbox: how many sandboxes the density row starts from one template, all
    /// running at once (and Firecracker restores its snapshot as many times); 0 skips it.
    #[arg(long, default_value_t = 100)]
    pub density: usize,
    /// bench sandbox: only the guest floor table, measured in the booted template (no
    /// checkpoint, start figures, memory or density rows): a quick measurement of the agent.
    #[arg(long)]
    pub floor_only: bool,
}

fn dormouse(kernel: &Path) -> anyhow::Result<Command> {
    dormouse_as(kernel, &Variant::Plain)
}

/// How a boot row runs `dormouse run`.
enum Variant {
    /// As it is (seccomp enforcing).
    Plain,
    /// With `--seccomp off`: the difference to `Plain` is what the filters cost.
    SeccompOff,
    /// Under `dormouse jail` (an unprivileged uid, no cgroups) with jails made in this
    /// directory, each run its own id: the difference to `Plain` is what the jail costs.
    Jailed {
        base: PathBuf,
        next: std::cell::Cell<u32>,
    },
}

/// The uid/gid the jailed rows run the VMM as (a jailed restore's snapshot is chowned to it).
const BENCH_JAIL_ID: u32 = 10999;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn dormouse_as(kernel: &Path, variant: &Variant) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("locating the dormouse binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["--log-level", "warn"]);
    if let Variant::Jailed { base, next } = variant {
        let id = format!("bench-{}-{}", std::process::id(), next.get());
        next.set(next.get() + 1);
        jail_args(&mut cmd, base, &id);
    }
    cmd.args(["run", "--kernel"])
        .arg(kernel)
        .args(["--mem-mib", "128"]);
    if matches!(variant, Variant::SeccompOff) {
        cmd.args(["--seccomp", "off"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    Ok(cmd)
}

/// `jail --id ID --uid U --gid U --chroot-base BASE --`: what a jailed bench row puts before
/// `run`/`restore` (the bench's unprivileged uid and gid, no cgroups).
fn jail_args(cmd: &mut Command, base: &Path, id: &str) {
    cmd.args(["jail", "--id", id, "--uid"])
        .arg(BENCH_JAIL_ID.to_string())
        .arg("--gid")
        .arg(BENCH_JAIL_ID.to_string())
        .arg("--chroot-base")
        .arg(base)
        .arg("--");
}

/// One run of the tiny guest: (start → first output byte, start → exit).
fn tiny_run(kernel: &Path) -> anyhow::Result<(Duration, Duration)> {
    tiny_run_as(kernel, &Variant::Plain)
}

fn tiny_run_as(kernel: &Path, variant: &Variant) -> anyhow::Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut child = dormouse_as(kernel, variant)?
        .spawn()
        .context("spawning dormouse")?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut first = [0u8; 1];
    out.read_exact(&mut first).context("no guest output")?;
    let first_output = start.elapsed();
    let mut rest = Vec::new();
    out.read_to_end(&mut rest)?;
    let status = child.wait()?;
    let exited = start.elapsed();
    if !status.success() {
        bail!("tiny guest run failed: {status}");
    }
    rest.insert(0, first[0]);
    if rest != tiny_guest::TINY_GUEST_MESSAGE {
        bail!(
            "unexpected tiny guest output {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    Ok((first_output, exited))
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `RssAnon`, …).
fn status_kib(child: &Child, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field}"))
}

/// Idle resident memory: all of it, and the part private to this VMM (anonymous pages; the
/// rest is code and constants shared with every other dormouse process through the page cache).
struct IdleRss {
    total_kib: u64,
    anon_kib: u64,
}

fn idle_rss(kernel: &Path) -> anyhow::Result<IdleRss> {
    let mut child = dormouse(kernel)?.spawn()?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut line = vec![0u8; tiny_guest::TINY_GUEST_MESSAGE.len()];
    out.read_exact(&mut line)?;
    std::thread::sleep(Duration::from_millis(200));
    let rss = status_kib(&child, "VmRSS").and_then(|total_kib| {
        Ok(IdleRss {
            total_kib,
            anon_kib: status_kib(&child, "RssAnon")?,
        })
    });
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait()?;
    rss
}

/// Time from process start to the kernel's "Run /init" line.
fn linux_run_init(kernel: &Path, initrd: Option<&Path>) -> anyhow::Result<Duration> {
    let mut cmd = dormouse(kernel)?;
    if let Some(i) = initrd {
        cmd.arg("--initrd").arg(i);
    }
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let out = child.stdout.take().context("no stdout")?;
    let mut found = None;
    for line in BufReader::new(out).lines() {
        if line?.contains("Run /init") {
            found = Some(start.elapsed());
            break;
        }
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait()?;
    found.context("the guest never printed \"Run /init\"")
}

pub fn bench(args: BenchArgs) -> anyhow::Result<i32> {
    match args.suite {
        Suite::Boot => bench_boot(&args),
        Suite::Io => bench_io(&args),
        Suite::Vsock => bench_vsock(&args),
        Suite::Snapshot => bench_snapshot(&args),
        Suite::Sandbox => bench_sandbox(&args),
        Suite::Store => bench_store(&args),
        Suite::Balloon => bench_balloon(&args),
        Suite::All => bench_all(&args),
    }
}

/// A suite of `all`: its name and how to run it (its exit code, 0 when it passed).
type SuiteRun = (&'static str, fn(&BenchArgs) -> anyhow::Result<i32>);

/// Every suite in turn: one that fails does not stop the others, and the result is non-zero
/// when any failed, naming them.
fn bench_all(args: &BenchArgs) -> anyhow::Result<i32> {
    let suites: [SuiteRun; 4] = [
        ("boot", bench_boot),
        ("io", bench_io),
        ("vsock", bench_vsock),
        ("snapshot", bench_snapshot),
    ];
    let mut outcomes = Vec::with_capacity(suites.len());
    for (i, (name, run)) in suites.into_iter().enumerate() {
        if i > 0 {
            println!();
        }
        let outcome = run(args);
        if let Err(e) = &outcome {
            eprintln!("bench {name}: {e:#}");
        }
        outcomes.push((name, outcome));
    }
    let failed = failed_suites(&outcomes);
    if failed.is_empty() {
        return Ok(0);
    }
    eprintln!("bench all: failed suites: {}", failed.join(", "));
    Ok(1)
}

/// The suites that failed: an error, or a non-zero exit code.
fn failed_suites<'a>(outcomes: &[(&'a str, anyhow::Result<i32>)]) -> Vec<&'a str> {
    outcomes
        .iter()
        .filter(|(_, outcome)| !matches!(outcome, Ok(0)))
        .map(|(name, _)| *name)
        .collect()
}

fn bench_sandbox(args: &BenchArgs) -> anyhow::Result<i32> {
    // With --images alone, only the images' table.
    if args.images.is_empty() || args.initrd.is_some() || args.rootfs.is_some() {
        sandbox::bench_sandbox(&sandbox::SandboxBench {
            kernel: args.kernel.as_deref(),
            initrd: args.initrd.as_deref(),
            rootfs: args.rootfs.as_deref(),
            runs: args.runs,
            density: args.density,
            peers: args.peers,
            floor_only: args.floor_only,
        })?;
    }
    if !args.images.is_empty() {
        let kernel = args
            .kernel
            .as_deref()
            .context("--images needs --kernel (the guest kernel the images boot)")?;
        println!();
        images::bench_images(&images::ImagesBench {
            kernel,
            repo: &args.repo,
            images: &args.images,
            runs: args.runs,
        })?;
    }
    Ok(0)
}

fn bench_snapshot(args: &BenchArgs) -> anyhow::Result<i32> {
    let series = snapshot::bench_snapshot(&snapshot::SnapshotBench {
        runs: args.runs,
        clones: args.clones,
        sizes_mib: &args.sizes_mib,
        peers: args.peers,
        kernel: args.kernel.as_deref(),
        initrd: args.initrd.as_deref(),
        plot: args.plot.as_deref(),
    })?;
    let live_rows = live::bench_live(&args.sizes_mib, args.runs)?;
    live::print_live(&live_rows, &series.dormouse, &series.peers);
    Ok(0)
}

fn bench_balloon(args: &BenchArgs) -> anyhow::Result<i32> {
    let kernel = args
        .kernel
        .as_deref()
        .context("the balloon suite needs --kernel (a guest kernel with CONFIG_VIRTIO_BALLOON)")?;
    balloon::bench_balloon(&balloon::BalloonBench {
        kernel,
        repo: &args.repo,
        fill_mib: args.fill_mib,
        settle: Duration::from_secs(args.balloon_settle_s),
    })?;
    Ok(0)
}

fn bench_store(args: &BenchArgs) -> anyhow::Result<i32> {
    store::bench_store(&store::StoreBench {
        runs: args.runs,
        store_url: args.store_url.as_deref(),
        kernel: args.kernel.as_deref(),
        initrd: args.initrd.as_deref(),
        rootfs: args.rootfs.as_deref(),
    })?;
    Ok(0)
}

fn bench_vsock(args: &BenchArgs) -> anyhow::Result<i32> {
    let ok = vsock::bench_vsock(&vsock::VsockBench {
        kernel: args.kernel.as_deref(),
        initrd: args.vsock_initrd.as_deref(),
        round_trips: args.vsock_round_trips,
        bytes: args.vsock_bytes,
        mock_bytes: args.vsock_mock_bytes,
    })?;
    Ok(if ok { 0 } else { 1 })
}

fn bench_io(args: &BenchArgs) -> anyhow::Result<i32> {
    let secs = args.io_secs;
    if !(secs.is_finite() && secs > 0.0 && secs <= 60.0) {
        bail!("--io-secs must be between 0 and 60, got {secs}");
    }
    io::bench_io(Duration::from_secs_f64(secs))?;
    Ok(0)
}

fn bench_boot(args: &BenchArgs) -> anyhow::Result<i32> {
    let dir = tempfile_dir()?;
    let reset = dir.join("tiny-reset.elf");
    let idle = dir.join("tiny-idle.elf");
    tiny_guest::write_to(&reset, TinyGuestEnd::Reset)?;
    tiny_guest::write_to(&idle, TinyGuestEnd::Idle)?;

    let runs = args.runs.max(1);
    let mut first_output = Vec::with_capacity(runs);
    let mut exit = Vec::with_capacity(runs);
    let jailed = is_root().then(|| Variant::Jailed {
        base: dir.join("jails"),
        next: std::cell::Cell::new(0),
    });
    // (first output, exit) of the --seccomp off and jailed runs, interleaved with the plain
    // ones so that all three see the same host.
    let mut off = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    let mut jail = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    tiny_run(&reset)?; // warm the page cache and the binary
    for i in 0..runs {
        // Which of the pair runs first alternates, so neither always follows the jailed run.
        let (plain_run, off_run) = if i.is_multiple_of(2) {
            let plain = tiny_run(&reset)?;
            (plain, tiny_run_as(&reset, &Variant::SeccompOff)?)
        } else {
            let off = tiny_run_as(&reset, &Variant::SeccompOff)?;
            (tiny_run(&reset)?, off)
        };
        first_output.push(plain_run.0);
        exit.push(plain_run.1);
        off.0.push(off_run.0);
        off.1.push(off_run.1);
        if let Some(variant) = &jailed {
            let (o, e) = tiny_run_as(&reset, variant).context("a jailed run")?;
            jail.0.push(o);
            jail.1.push(e);
        }
    }
    let seccomp_cost = report::paired_cost(&first_output, &off.0);
    let o = stats(first_output).context("no samples")?;
    let e = stats(exit).context("no samples")?;
    let rss = idle_rss(&idle)?;
    let floors = floor::measure(&reset, runs)?;

    println!("| boot figure ({runs} runs, tiny guest) | min | median | target |");
    println!("|---|---|---|---|");
    println!(
        "| process start → first serial output | {} | {} | ≤ 2 ms median |",
        ms(o.min),
        ms(o.median)
    );
    println!(
        "| process start → process exit | {} | {} | ≤ 5 ms median |",
        ms(e.min),
        ms(e.median)
    );
    let off_o = stats(off.0).context("no samples")?;
    let off_e = stats(off.1).context("no samples")?;
    println!(
        "| process start → first serial output, --seccomp off | {} | {} | seccomp costs nothing measurable |",
        ms(off_o.min),
        ms(off_o.median)
    );
    println!(
        "| process start → process exit, --seccomp off | {} | {} | |",
        ms(off_e.min),
        ms(off_e.median)
    );
    match seccomp_cost {
        Some(cost) => println!(
            "| seccomp's cost to first output: median of the {runs} paired differences [95 % interval] | {} | | {} |",
            report::paired(&cost),
            if cost.measurable() && cost.median_ms > 0.0 { "MISSED" } else { "met" }
        ),
        None => println!("| seccomp's cost to first output | too few runs for an interval (≥ 6) | | |"),
    }
    match (stats(jail.0), stats(jail.1)) {
        (Some(jo), Some(je)) => {
            println!(
                "| process start → first serial output, jailed (`dormouse jail … -- run`) | {} | {} | milliseconds |",
                ms(jo.min),
                ms(jo.median)
            );
            println!(
                "| process start → process exit, jailed (cleanup included) | {} | {} | |",
                ms(je.min),
                ms(je.median)
            );
        }
        _ => {
            println!("| process start → first serial output, jailed | skipped (needs root) | | |");
            println!("| process start → process exit, jailed | skipped (needs root) | | |");
        }
    }
    println!(
        "| idle VMM RSS (of which private: {:.2} MiB) | {:.2} MiB | | ≤ 3 MiB |",
        rss.anon_kib as f64 / 1024.0,
        rss.total_kib as f64 / 1024.0
    );
    println!(
        "| baseline: process spawn → exit of dormouse doing nothing (exec + libc start-up) | {} | {} | |",
        ms(floors.process.min),
        ms(floors.process.median)
    );
    println!(
        "| baseline: in-process KVM VM + vCPU built → first serial output (no process start, threads or devices) | {} | {} | |",
        ms(floors.kvm.min),
        ms(floors.kvm.median)
    );
    let floor_sum = floors.process.median + floors.kvm.median;
    println!(
        "| dormouse above both baselines (start → output median − their medians) | | {} | |",
        ms(o.median.saturating_sub(floor_sum))
    );
    match &args.kernel {
        Some(k) => {
            let t = linux_run_init(k, args.initrd.as_deref())?;
            println!(
                "| Linux guest: process start → \"Run /init\" | {} | | (host-dependent) |",
                ms(t)
            );
        }
        None => {
            println!("| Linux guest: process start → \"Run /init\" | skipped (pass --kernel) | | |")
        }
    }
    boot_peers::bench(args.peers, runs, &dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(0)
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("dormouse-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_suites_are_errors_and_nonzero_codes() {
        let outcomes = vec![
            ("boot", Ok(0)),
            ("io", Err(anyhow::anyhow!("no KVM"))),
            ("vsock", Ok(1)),
            ("snapshot", Ok(0)),
        ];
        assert_eq!(failed_suites(&outcomes), vec!["io", "vsock"]);
        assert!(failed_suites(&[("boot", Ok(0)), ("io", Ok(0))]).is_empty());
    }
}
