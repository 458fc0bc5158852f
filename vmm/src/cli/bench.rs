//! `dormouse bench`: runs the measurements and prints one table.
//!
//! `boot`: process start → first serial output and → process exit, over N runs of the tiny test
//! guest (see `vmm::tiny_guest`), the VMM's idle RSS, and (with --kernel) a Linux guest's time to
//! `Run /init`.
//!
//! `io`: virtio-blk and virtio-net datapath cost with a mock guest driver (see `io`).
//!
//! `all`: every suite, one table after the other.

mod io;

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
    /// Measuring time of each io row, in seconds.
    #[arg(long, default_value_t = 0.5)]
    pub io_secs: f64,
}

pub struct Stats {
    pub min: Duration,
    pub median: Duration,
}

pub fn stats(mut samples: Vec<Duration>) -> Option<Stats> {
    samples.sort();
    Some(Stats {
        min: *samples.first()?,
        median: samples[samples.len() / 2],
    })
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn dormouse(kernel: &Path) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("locating the dormouse binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["--log-level", "warn", "run", "--kernel"])
        .arg(kernel)
        .args(["--mem-mib", "128"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    Ok(cmd)
}

/// One run of the tiny guest: (start → first output byte, start → exit).
fn tiny_run(kernel: &Path) -> anyhow::Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut child = dormouse(kernel)?.spawn().context("spawning dormouse")?;
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

fn rss_kib(child: &Child) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

fn idle_rss(kernel: &Path) -> anyhow::Result<u64> {
    let mut child = dormouse(kernel)?.spawn()?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut line = vec![0u8; tiny_guest::TINY_GUEST_MESSAGE.len()];
    out.read_exact(&mut line)?;
    std::thread::sleep(Duration::from_millis(200));
    let rss = rss_kib(&child);
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
        Suite::All => {
            bench_boot(&args)?;
            println!();
            bench_io(&args)
        }
    }
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
    tiny_run(&reset)?; // warm the page cache and the binary
    for _ in 0..runs {
        let (o, e) = tiny_run(&reset)?;
        first_output.push(o);
        exit.push(e);
    }
    let o = stats(first_output).context("no samples")?;
    let e = stats(exit).context("no samples")?;
    let rss = idle_rss(&idle)?;

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
    println!(
        "| idle VMM RSS | {:.2} MiB | | ≤ 3 MiB |",
        rss as f64 / 1024.0
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
    fn stats_min_and_median() {
        let s = stats(vec![
            Duration::from_millis(5),
            Duration::from_millis(1),
            Duration::from_millis(3),
        ])
        .unwrap();
        assert_eq!(s.min, Duration::from_millis(1));
        assert_eq!(s.median, Duration::from_millis(3));
        assert!(stats(vec![]).is_none());
    }
}
