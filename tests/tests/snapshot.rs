//! End-to-end snapshot/restore tests. One Linux guest is booted once; every test restores from
//! its snapshot (a guest kernel under emulation boots in ~11 s, a restore takes milliseconds).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tests::*;

/// A dormouse process running the counting guest, with its API socket.
struct CountingVm {
    vm: Running,
    sock: PathBuf,
}

impl CountingVm {
    fn spawn(args: &[&str], sock: &Path) -> Self {
        let mut cmd = Command::new(dormouse_bin());
        cmd.args(args).arg("--api-sock").arg(sock);
        CountingVm {
            vm: Running::spawn(cmd),
            sock: sock.to_path_buf(),
        }
    }

    /// The next sequence number printed.
    fn next_count(&self, timeout: Duration) -> u64 {
        let line = self.vm.wait_for("seq=", timeout);
        count_of(&line).unwrap_or_else(|| panic!("bad count line {line:?}"))
    }

    /// The highest count among `last` and the lines already printed.
    fn drain_counts(&self, mut last: u64) -> u64 {
        while let Some(line) = self.vm.try_recv() {
            if let Some(c) = count_of(&line) {
                last = last.max(c);
            }
        }
        last
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(dormouse_bin())
            .arg("ctl")
            .arg("--sock")
            .arg(&self.sock)
            .args(args)
            .output()
            .expect("dormouse ctl")
    }

    fn kill(self) {
        self.vm.kill();
    }

    fn pid(&self) -> u32 {
        self.vm.pid()
    }
}

/// The sequence number in a ping reply line ("64 bytes from 127.0.0.1: seq=7 ttl=64 …").
fn count_of(line: &str) -> Option<u64> {
    line.split("seq=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

struct BaseSnapshot {
    _dir: tempfile::TempDir,
    snapshot: PathBuf,
    /// Last count printed before the snapshot was taken.
    count_at_snapshot: u64,
}

/// Boots the counting guest once per test process, snapshots it, and kills it.
fn base_snapshot() -> &'static BaseSnapshot {
    static BASE: OnceLock<BaseSnapshot> = OnceLock::new();
    BASE.get_or_init(|| {
        // In the run directory: a `static` is never dropped, so its TempDir would never be.
        let dir = run_tempdir();
        let initrd = build_initrd(
            dir.path(),
            "count.cpio",
            // One long-lived process that prints a growing sequence number every second: no
            // fork per tick (a fork+exec costs ~0.45 s of emulated kernel time on a PVM host).
            "ip link set lo up; exec ping -i 1 127.0.0.1",
        );
        let kernel = vmlinux();
        let sock = dir.path().join("boot.sock");
        let _serial = linux_boot_lock();
        let vm = CountingVm::spawn(
            &[
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--initrd",
                initrd.to_str().unwrap(),
            ],
            &sock,
        );
        let mut count = vm.next_count(LINUX_BOOT_TIMEOUT);
        while count < 2 {
            count = vm.next_count(Duration::from_secs(30));
        }
        let snapshot = dir.path().join("base");
        let out = vm.ctl(&["snapshot", "--dir", snapshot.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Counts printed while the snapshot was being taken.
        count = vm.drain_counts(count);
        vm.kill();
        BaseSnapshot {
            _dir: dir,
            snapshot,
            count_at_snapshot: count,
        }
    })
}

fn restore(dir: &Path, sock: &Path, extra: &[&str]) -> CountingVm {
    let mut args = vec!["restore", "--dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    CountingVm::spawn(&args, sock)
}

#[test]
fn restored_guest_continues_counting_and_diff_chain_restores() {
    if !require_kvm() {
        return;
    }
    let base = base_snapshot();
    let tmp = tempfile::tempdir().unwrap();
    let vm = restore(&base.snapshot, &tmp.path().join("a.sock"), &[]);
    let first = vm.next_count(Duration::from_secs(30));
    // It goes on from where it was (not from 1), and keeps counting.
    assert!(
        first > 0 && first <= base.count_at_snapshot + 1,
        "first count after restore {first}, snapshot at {}",
        base.count_at_snapshot
    );
    let second = vm.next_count(Duration::from_secs(30));
    assert_eq!(second, first + 1);

    // A directory holding someone else's file is never written to, even with --replace; the
    // refusal comes before the dirty log is read, so the diff below still has every page.
    let busy = tmp.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), b"keep me").unwrap();
    let refused = vm.ctl(&[
        "snapshot",
        "--dir",
        busy.to_str().unwrap(),
        "--diff",
        "--replace",
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(
        !refused.status.success() && stderr.contains("notes.txt"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(busy.join("notes.txt")).unwrap(), b"keep me");
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);

    // A diff on top of the base: small, and the chain restores.
    let diff = tmp.path().join("diff");
    let out = vm.ctl(&["snapshot", "--dir", diff.to_str().unwrap(), "--diff"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(info.contains("\"diff\": true"), "{info}");
    // A snapshot is not overwritten without --replace.
    let again = vm.ctl(&["snapshot", "--dir", diff.to_str().unwrap(), "--diff"]);
    let stderr = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(
        !again.status.success() && stderr.contains("--replace"),
        "{stderr}"
    );
    let last = vm.drain_counts(second);
    vm.kill();
    let base_alloc = allocated_bytes(&base.snapshot.join("memory.bin"));
    let diff_alloc = allocated_bytes(&diff.join("memory.bin"));
    assert!(
        diff_alloc * 4 < base_alloc,
        "diff ({diff_alloc} bytes) should be far smaller than the base ({base_alloc})"
    );
    let vm = restore(&diff, &tmp.path().join("b.sock"), &[]);
    let c = vm.next_count(Duration::from_secs(30));
    assert!(
        c > second && c <= last + 1,
        "count {c} after the diff restore (before: {last})"
    );
    vm.kill();

    // Merging the chain gives a standalone full snapshot that restores to the same point.
    let merged = tmp.path().join("merged");
    let out = run_dormouse(
        &[
            "snapshot",
            "merge",
            "--dir",
            diff.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    let manifest = std::fs::read_to_string(merged.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"parent\": null"), "{manifest}");
    let vm = restore(&merged, &tmp.path().join("m.sock"), &[]);
    let m = vm.next_count(Duration::from_secs(30));
    assert!(
        m > second && m <= last + 1,
        "count {m} after the merged restore (before: {last})"
    );
    vm.kill();
}

/// A console writer whose bytes the test can read while the VM runs.
#[derive(Clone, Default)]
struct SharedOutput(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedOutput {
    fn counts(&self) -> Vec<u64> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).to_string();
        text.lines().filter_map(count_of).collect()
    }
}

#[test]
fn hibernate_and_wake_fifty_times_loses_nothing() {
    if !require_kvm() {
        return;
    }
    let base = base_snapshot();
    let tmp = tempfile::tempdir().unwrap();
    let out = SharedOutput::default();
    let console = |o: &SharedOutput| vmm::Console::Writer(Box::new(o.clone()));
    let mut vm = vmm::Vm::wake(&base.snapshot, console(&out)).expect("first wake");
    let mut last_seen = 0u64;
    for cycle in 0..50 {
        // Wait until the guest has made progress in this life.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(&c) = out.counts().last() {
                if c > last_seen {
                    last_seen = c;
                    break;
                }
            }
            assert!(Instant::now() < deadline, "no progress in cycle {cycle}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Alternate directories: never overwrite the snapshot this VM is mapped from. From the
        // third cycle on each holds this test's previous snapshot: replace it.
        let dir = tmp.path().join(if cycle % 2 == 0 { "a" } else { "b" });
        vm.hibernate(&dir, true)
            .unwrap_or_else(|e| panic!("hibernate {cycle}: {e}"));
        vm = vmm::Vm::wake(&dir, console(&out)).unwrap_or_else(|e| panic!("wake {cycle}: {e}"));
    }
    // Across 50 lives the sequence only ever goes up by one (a line printed after the snapshot
    // but before the hibernate finished may be printed again by the next life).
    let counts = out.counts();
    for w in counts.windows(2) {
        assert!(
            w[1] == w[0] + 1 || w[1] == w[0],
            "count went from {} to {} across hibernate/wake",
            w[0],
            w[1]
        );
    }
    assert!(counts.len() >= 50, "{} counts", counts.len());
    drop(vm);
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn pss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn ten_clones_share_memory_and_run_independently() {
    if !require_kvm() {
        return;
    }
    let base = base_snapshot();
    let tmp = tempfile::tempdir().unwrap();
    let clones: Vec<CountingVm> = (0..10)
        .map(|i| restore(&base.snapshot, &tmp.path().join(format!("c{i}.sock")), &[]))
        .collect();
    for c in &clones {
        let a = c.next_count(Duration::from_secs(60));
        let b = c.next_count(Duration::from_secs(60));
        assert_eq!(b, a + 1, "each clone counts on its own");
    }
    // Pausing one clone does not stop the others.
    assert!(clones[0].ctl(&["pause"]).status.success());
    let info = String::from_utf8_lossy(&clones[0].ctl(&["info"]).stdout).to_string();
    assert!(info.contains("\"paused\""), "{info}");
    let before = clones[1].next_count(Duration::from_secs(30));
    assert!(clones[1].next_count(Duration::from_secs(30)) > before);
    assert!(clones[0].ctl(&["resume"]).status.success());

    let total_pss: u64 = clones.iter().map(|c| pss_kib(c.pid())).sum();
    let guest_data_kib = allocated_bytes(&base.snapshot.join("memory.bin")) / 1024;
    eprintln!("10 clones: total PSS {total_pss} KiB; one guest's memory {guest_data_kib} KiB");
    assert!(total_pss > 0);
    assert!(
        total_pss < 10 * guest_data_kib / 2,
        "clones should share the snapshot's pages: total PSS {total_pss} KiB vs 10 × {guest_data_kib} KiB"
    );
    for c in clones {
        c.kill();
    }
}

#[test]
fn damaged_snapshots_are_refused_with_clear_errors() {
    if !require_kvm() {
        return;
    }
    let base = base_snapshot();
    let tmp = tempfile::tempdir().unwrap();
    let copy = |name: &str| -> PathBuf {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["manifest.json", "state.bin", "memory.bin"] {
            std::fs::copy(base.snapshot.join(f), d.join(f)).unwrap();
        }
        d
    };
    let restore_err = |dir: &Path| -> String {
        let out = run_dormouse(
            &[
                "restore",
                "--dir",
                dir.to_str().unwrap(),
                "--console",
                "null",
            ],
            Duration::from_secs(30),
        );
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(!stderr.contains("panicked at"), "{stderr}");
        stderr
    };

    let bad_crc = copy("crc");
    let mut state = std::fs::read(bad_crc.join("state.bin")).unwrap();
    let last = state.len() - 1;
    state[last] ^= 0x40;
    std::fs::write(bad_crc.join("state.bin"), state).unwrap();
    let e = restore_err(&bad_crc);
    assert!(
        e.to_lowercase().contains("crc") || e.contains("checksum"),
        "{e}"
    );

    let truncated = copy("short");
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("memory.bin"))
        .unwrap();
    mem.set_len(4096).unwrap();
    let e = restore_err(&truncated);
    assert!(e.contains("memory"), "{e}");

    let missing = tmp.path().join("nothing-here");
    let e = restore_err(&missing);
    assert!(e.contains("nothing-here"), "{e}");
}
