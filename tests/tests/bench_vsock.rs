//! `dormouse bench vsock` end to end: builds the vsock test guest's initrd with
//! deploy/build-vsock-bench-initrd.sh, runs the suite once with small counts against the real
//! guest (one boot), and checks the table: mock-driver rows, then for both host paths (the
//! in-process `VsockHandle` and the hybrid Unix socket) a round-trip latency row and a
//! throughput row each way, every figure positive. The figures themselves are not judged here:
//! speed targets belong to the benchmark's output, not to a test.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::*;

const ROUND_TRIPS: usize = 50;
const BYTES: u64 = 256 << 10;

/// Where `static_guest_binary` builds, so the script reuses that build.
fn guest_tools_dir() -> PathBuf {
    match std::env::var_os("DORMOUSE_GUEST_TOOLS_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe()
            .expect("current_exe")
            .ancestors()
            .nth(3)
            .expect("test binary lives in <target>/<profile>/deps")
            .join("guest-tools"),
    }
}

fn build_bench_initrd(dir: &std::path::Path) -> PathBuf {
    let out = dir.join("vsock-bench.cpio");
    let result = Command::new(repo_root().join("deploy/build-vsock-bench-initrd.sh"))
        .arg("--out")
        .arg(&out)
        .env("DORMOUSE_GUEST_TOOLS_DIR", guest_tools_dir())
        .stderr(Stdio::inherit())
        .output()
        .expect("running deploy/build-vsock-bench-initrd.sh");
    assert!(
        result.status.success(),
        "deploy/build-vsock-bench-initrd.sh failed"
    );
    let printed = String::from_utf8_lossy(&result.stdout);
    let printed = PathBuf::from(printed.lines().last().unwrap_or_default().trim());
    assert_eq!(printed, out, "the script prints the initrd's path last");
    assert!(out.metadata().is_ok_and(|m| m.len() > 0), "initrd written");
    out
}

/// The table rows (`| a | b | ... |`) as trimmed cells.
fn rows(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("|---"))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// Every number in a cell ("12.5 µs / 14.0 µs" → [12.5, 14.0]).
fn numbers(cell: &str) -> Vec<f64> {
    cell.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.parse().ok())
        .collect()
}

fn row<'a>(rows: &'a [Vec<String>], needle: &str, stdout: &str) -> &'a [String] {
    let found: Vec<_> = rows
        .iter()
        .filter(|r| r.first().is_some_and(|c| c.contains(needle)))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one row containing {needle:?} in:\n{stdout}"
    );
    found[0]
}

#[test]
fn bench_vsock_measures_latency_and_throughput_on_the_real_guest() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = build_bench_initrd(dir.path());
    let kernel = vmlinux();
    let _serial = linux_boot_lock();
    let round_trips = ROUND_TRIPS.to_string();
    let bytes = BYTES.to_string();
    let out = run_dormouse(
        &[
            "--log-level",
            "warn",
            "bench",
            "vsock",
            "--kernel",
            kernel.to_str().unwrap(),
            "--vsock-initrd",
            initrd.to_str().unwrap(),
            "--vsock-round-trips",
            &round_trips,
            "--vsock-bytes",
            &bytes,
            "--vsock-mock-bytes",
            &bytes,
        ],
        // The bench's own boot timeout is 300 s.
        Duration::from_secs(300 + 180),
    );
    let (stdout, stderr) = text(&out);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "dormouse bench vsock failed: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    let rows = rows(&stdout);

    // Mock driver: ns/packet and packets/s, both directions.
    let mock: Vec<_> = rows
        .iter()
        .filter(|r| r.first().is_some_and(|c| c.starts_with("mock driver")))
        .collect();
    assert_eq!(mock.len(), 5, "mock-driver rows in:\n{stdout}");
    for dir in ["guest → host", "host → guest"] {
        assert!(
            mock.iter().any(|r| r[0].contains(dir)),
            "a mock {dir} row:\n{stdout}"
        );
    }
    for r in &mock {
        assert!(r[1].contains("ns/packet"), "{r:?}");
        assert!(numbers(&r[1]).first().is_some_and(|&ns| ns > 0.0), "{r:?}");
        assert!(numbers(&r[2]).first().is_some_and(|&p| p > 0.0), "{r:?}");
    }

    // The real guest: the host kind is named, then both host paths.
    let host = row(&rows, "real guest: host", &stdout);
    assert!(
        host[0].contains("KVM") || host[0].contains("PVM"),
        "{host:?}"
    );
    for path in ["in-process VsockHandle", "hybrid Unix socket"] {
        let rtt = row(&rows, &format!("{path}: 1-byte ping-pong"), &stdout);
        assert!(rtt[0].contains(&format!("of {ROUND_TRIPS}")), "{rtt:?}");
        let (min, median) = match numbers(&rtt[1])[..] {
            [min, median] => (min, median),
            _ => panic!("min / median in {rtt:?}"),
        };
        assert!(min > 0.0 && min <= median, "{rtt:?}");
        assert!(
            numbers(&rtt[2]).first().is_some_and(|&r| r > 0.0),
            "{rtt:?}"
        );
        for dir in ["host → guest", "guest → host"] {
            let t = row(&rows, &format!("{path}: {dir}, {BYTES} bytes"), &stdout);
            let mib_s = t.get(3).map(|c| numbers(c)).unwrap_or_default();
            assert!(mib_s.first().is_some_and(|&m| m > 0.0), "MiB/s in {t:?}");
        }
    }
    assert!(!stdout.contains("failed"), "{stdout}");
}
