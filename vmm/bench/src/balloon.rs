//! `dormouse bench balloon`: memory that flows back (docs/balloon.md). A Linux guest with the
//! balloon (free page reporting) fills a tmpfs file of `--fill-mib` MiB and deletes it; the
//! rows are the VMM's anonymous RSS before, at the peak and `--balloon-settle-s` seconds after
//! the free (with the share of the fill returned, against the 90 % goal), and the size on disk
//! of a full snapshot taken then (its memory file is sparse: only what is still in use).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::report::bytes;

/// The goal of issue 15: at least this share of freed memory goes back to the host.
const GOAL_PERCENT: f64 = 90.0;

pub struct BalloonBench<'a> {
    pub kernel: &'a Path,
    pub repo: &'a Path,
    pub fill_mib: u64,
    pub settle: Duration,
}

/// Guest memory: the fill plus room for the kernel and the page cache.
fn guest_mem_mib(fill_mib: u64) -> u64 {
    fill_mib + 256
}

fn guest_script(fill_mib: u64, mem_mib: u64) -> String {
    format!(
        "mkdir -p /fill; mount -t tmpfs -o size={mem_mib}m tmpfs /fill; echo BENCH-BOOTED; \
         sleep 5; echo BENCH-FILLING; dd if=/dev/zero of=/fill/f bs=1M count={fill_mib} \
         2>/dev/null; echo BENCH-FILLED; sleep 1; rm /fill/f; echo BENCH-FREED; exec sleep 86400"
    )
}

fn rss_anon(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no RssAnon")?;
    Ok(kib * 1024)
}

/// Guest console lines, read on a thread.
fn lines_of(child: &mut Child) -> anyhow::Result<Receiver<String>> {
    let out = child.stdout.take().context("no stdout")?;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

fn wait_line(lines: &Receiver<String>, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return Ok(()),
            Ok(_) => {}
            Err(_) => bail!("the guest did not print {needle:?} within {timeout:?}"),
        }
    }
}

fn build_initrd(repo: &Path, dir: &Path, script: &str) -> anyhow::Result<std::path::PathBuf> {
    let out = dir.join("balloon-bench.cpio");
    let status = Command::new(repo.join("deploy/build-initrd.sh"))
        .arg("--out")
        .arg(&out)
        .arg("--command")
        .arg(script)
        .stdout(Stdio::null())
        .status()
        .context("running deploy/build-initrd.sh (run from the repository or pass --repo)")?;
    if !status.success() {
        bail!("deploy/build-initrd.sh failed");
    }
    Ok(out)
}

struct Figures {
    before: u64,
    peak: u64,
    after: u64,
    fill_time: Duration,
    snapshot_bytes: u64,
}

fn measure(opts: &BalloonBench<'_>, dir: &Path) -> anyhow::Result<Figures> {
    let mem_mib = guest_mem_mib(opts.fill_mib);
    let initrd = build_initrd(opts.repo, dir, &guest_script(opts.fill_mib, mem_mib))?;
    let sock = dir.join("api.sock");
    let exe = std::env::current_exe().context("locating the dormouse binary")?;
    let mut child = Command::new(&exe)
        .args(["--log-level", "warn", "run", "--kernel"])
        .arg(opts.kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--mem-mib", &mem_mib.to_string(), "--balloon", ","])
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning dormouse")?;
    let result = (|| {
        let lines = lines_of(&mut child)?;
        let pid = child.id();
        wait_line(&lines, "BENCH-BOOTED", Duration::from_secs(600))?;
        wait_line(&lines, "BENCH-FILLING", Duration::from_secs(60))?;
        let before = rss_anon(pid)?;
        let started = Instant::now();
        // Filling costs seconds per MiB where the guest's ring 0 is emulated.
        wait_line(&lines, "BENCH-FILLED", Duration::from_secs(3600))?;
        let fill_time = started.elapsed();
        let peak = rss_anon(pid)?;
        wait_line(&lines, "BENCH-FREED", Duration::from_secs(120))?;
        std::thread::sleep(opts.settle);
        let after = rss_anon(pid)?;
        let snapshot = dir.join("after-free");
        let out = Command::new(&exe)
            .args(["ctl", "--sock"])
            .arg(&sock)
            .args(["--timeout", "600", "snapshot", "--dir"])
            .arg(&snapshot)
            .output()
            .context("dormouse ctl snapshot")?;
        if !out.status.success() {
            bail!("snapshot: {}", String::from_utf8_lossy(&out.stderr));
        }
        let snapshot_bytes = std::fs::metadata(snapshot.join("memory.bin"))?.blocks() * 512;
        Ok(Figures {
            before,
            peak,
            after,
            fill_time,
            snapshot_bytes,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Share of what the fill added that went back: how far RSS fell from the peak, over how far
/// it rose (the guest reuses some pages it had touched before, so the rise can be below the
/// fill).
fn returned_percent(f: &Figures) -> f64 {
    let grown = f.peak.saturating_sub(f.before);
    if grown == 0 {
        return 0.0;
    }
    f.peak.saturating_sub(f.after) as f64 / grown as f64 * 100.0
}

pub fn bench_balloon(opts: &BalloonBench<'_>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let f = measure(opts, dir.path())?;
    let returned = returned_percent(&f);
    let verdict = if returned >= GOAL_PERCENT {
        "meets"
    } else {
        "misses"
    };
    println!(
        "balloon: a guest with free page reporting fills and frees {} MiB (guest memory {} MiB)",
        opts.fill_mib,
        guest_mem_mib(opts.fill_mib)
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| VMM anonymous RSS before the fill | {} |",
        bytes(f.before)
    );
    println!(
        "| at the peak (fill took {:.1} s) | {} |",
        f.fill_time.as_secs_f64(),
        bytes(f.peak)
    );
    println!(
        "| {} s after the free | {} |",
        opts.settle.as_secs(),
        bytes(f.after)
    );
    println!(
        "| returned to the host | {} = {returned:.1} % of the rise ({verdict} the {GOAL_PERCENT:.0} % goal) |",
        bytes(f.peak.saturating_sub(f.after))
    );
    println!(
        "| full snapshot after the free (memory.bin on disk) | {} |",
        bytes(f.snapshot_bytes)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_share_returned_is_the_fall_from_the_peak_over_the_fill() {
        let f = Figures {
            before: 100 * MIB,
            peak: 1124 * MIB,
            after: 200 * MIB,
            fill_time: Duration::ZERO,
            snapshot_bytes: 0,
        };
        assert!((returned_percent(&f) - 90.234375).abs() < 1e-9);
        let none = Figures { after: f.peak, ..f };
        assert_eq!(returned_percent(&none), 0.0);
    }

    #[test]
    fn the_guest_script_fills_the_asked_size() {
        let s = guest_script(64, 320);
        assert!(s.contains("count=64"));
        assert!(s.contains("size=320m"));
    }
}
