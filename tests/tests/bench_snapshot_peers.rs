//! `dormouse bench snapshot` runs peer VMMs found on PATH on the same tiny guest: with QEMU
//! installed its rows hold figures and the ratios table compares them with dormouse's; without
//! it the bench says it was not found. Firecracker and Cloud Hypervisor are checked for their
//! line everywhere, and for their figures where `../shared/peers/bin` has them (the last test
//! puts that folder on PATH; CI has it beside the checkout, but no peer on PATH).

use std::path::PathBuf;
use std::time::Duration;

use tests::*;

const QEMU: &str = "qemu-system-x86_64";

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The cells of the table row starting with `label`.
fn row<'a>(stdout: &'a str, label: &str) -> Vec<&'a str> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("| {label} |")))
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{stdout}"));
    line.split('|')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// The rows of the table whose header starts with `header`.
fn table<'a>(stdout: &'a str, header: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with(header))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect()
}

fn ms_of(cell: &str) -> Option<f64> {
    cell.strip_suffix(" ms")?.parse().ok()
}

fn size_of(cell: &str) -> Option<f64> {
    let (number, unit) = cell.trim().split_once(' ')?;
    let n: f64 = number.parse().ok()?;
    match unit {
        "KiB" => Some(n * 1024.0),
        "MiB" => Some(n * 1024.0 * 1024.0),
        _ => None,
    }
}

#[test]
fn bench_snapshot_runs_qemu_on_the_tiny_guest_or_says_it_is_missing() {
    if !require_kvm() {
        return;
    }
    let out = run_dormouse(
        &[
            "bench",
            "snapshot",
            "--runs",
            "2",
            "--clones",
            "2",
            "--sizes-mib",
            "64",
        ],
        Duration::from_secs(600),
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");

    for peer in ["firecracker", "cloud-hypervisor"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{peer}: ")))
            .unwrap_or_else(|| panic!("no {peer} line in:\n{stdout}"));
        // Whether found or not, the bench says which release each runner was verified with.
        assert!(line.contains("verified against"), "{line}");
        assert!(!line.contains("unverified"), "{line}");
    }

    let Some(qemu) = on_path(QEMU) else {
        assert!(
            stdout.contains(&format!("{QEMU}: not found")),
            "no 'not found' line for QEMU:\n{stdout}"
        );
        assert!(!stdout.contains("| qemu 64 MiB"), "{stdout}");
        return;
    };
    assert!(
        stdout.contains(&format!("{QEMU}: found at {}", qemu.display())),
        "{stdout}"
    );
    for label in ["qemu 64 MiB idle", "qemu 64 MiB all touched"] {
        let cells = row(&stdout, label);
        assert_eq!(cells.len(), 8, "{label}: {cells:?}");
        let boot = ms_of(cells[1]).unwrap_or_else(|| panic!("{label}: boot {:?}", cells[1]));
        assert!(boot > 0.0, "{label}: boot {boot}");
        let pause = ms_of(cells[2]).unwrap_or_else(|| panic!("{label}: pause {:?}", cells[2]));
        assert!(pause > 0.0, "{label}: pause {pause}");
        let (median, first) = cells[3].split_once(" (").expect("snapshot (first)");
        for t in [median, first.trim_end_matches(')')] {
            let t = ms_of(t).unwrap_or_else(|| panic!("{label}: snapshot {:?}", cells[3]));
            assert!(t > 0.0 && t < 600_000.0, "{label}: snapshot {t} ms");
        }
        let (apparent, allocated) = cells[4].split_once(" / ").expect("apparent / allocated");
        let apparent = size_of(apparent).unwrap_or_else(|| panic!("{label}: {apparent:?}"));
        let allocated = size_of(allocated).unwrap_or_else(|| panic!("{label}: {allocated:?}"));
        assert!(apparent > 0.0 && allocated > 0.0, "{label}: {cells:?}");
        if label.ends_with("touched") {
            // QEMU skips zero pages only: every page the guest wrote is in its stream.
            assert!(apparent > 60.0 * 1024.0 * 1024.0, "{label}: {apparent}");
        } else {
            assert!(apparent < 16.0 * 1024.0 * 1024.0, "{label}: {apparent}");
        }
        assert_eq!(cells[5], "n/a", "{label}");
        let restore = ms_of(cells[6]).unwrap_or_else(|| panic!("{label}: restore {:?}", cells[6]));
        assert!(
            restore > 0.0 && restore < 600_000.0,
            "{label}: restore {restore}"
        );
        let rss = size_of(cells[7]).unwrap_or_else(|| panic!("{label}: RSS {:?}", cells[7]));
        assert!(rss > 1024.0 * 1024.0, "{label}: RSS {rss}");
    }

    let ratios = table(&stdout, "| dormouse vs peer");
    let qemu_ratios: Vec<&str> = ratios
        .iter()
        .copied()
        .filter(|l| l.starts_with("| qemu 64 MiB"))
        .collect();
    assert_eq!(qemu_ratios.len(), 2, "ratios table:\n{stdout}");
    for line in qemu_ratios {
        let cells: Vec<&str> = line
            .split('|')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(cells.len(), 5, "{line}");
        for cell in &cells[1..] {
            tests::ratio_cell(cell, line);
        }
    }
}

/// A peer that is found but fails shows its error in its rows; the bench still succeeds.
#[test]
fn a_failing_peer_fills_its_rows_with_the_error_and_the_bench_goes_on() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, script) in [
        ("firecracker", "#!/bin/sh\nexit 3\n"),
        (
            "cloud-hypervisor",
            "#!/bin/sh\necho 'no kvm here'\nexit 1\n",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, script).expect("writing a fake peer");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
    }
    // Only the fakes on PATH: QEMU, even if installed, is not found.
    let out = std::process::Command::new(dormouse_bin())
        .args(["bench", "snapshot", "--runs", "1", "--clones", "2"])
        .args(["--sizes-mib", "16"])
        .env("PATH", dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running dormouse bench snapshot");
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("{QEMU}: not found")), "{stdout}");
    for (peer, error) in [
        ("firecracker", "exit status: 3"),
        ("cloud-hypervisor", "no kvm here"),
    ] {
        for case in ["16 MiB idle", "16 MiB all touched"] {
            let cells = row(&stdout, &format!("{peer} {case}"));
            assert!(cells[1].starts_with("failed: "), "{cells:?}");
            assert!(cells[1].contains(error), "{cells:?}");
            assert_eq!(
                cells.len(),
                2,
                "an error row has one non-empty cell: {cells:?}"
            );
        }
        assert!(
            stdout.contains(&format!(
                "{peer}: found at {}",
                dir.path().join(peer).display()
            )),
            "{stdout}"
        );
    }
}

/// With the Firecracker and Cloud Hypervisor binaries of `../shared/peers/bin` (beside the
/// checkout, on CI too) on PATH, both peers measure the tiny guest: their rows hold figures,
/// the ratios table compares them, and `--plot` draws a series for each. Skipped without them.
#[test]
fn bench_snapshot_runs_firecracker_and_cloud_hypervisor_from_shared_peers() {
    if !require_kvm() {
        return;
    }
    let peers = repo_root().join("../shared/peers/bin");
    if !peers.join("firecracker").is_file() || !peers.join("cloud-hypervisor").is_file() {
        eprintln!("skipped: no peer binaries in {}", peers.display());
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let chart = dir.path().join("chart.svg");
    let mut path = std::ffi::OsString::from(&peers);
    if let Some(rest) = std::env::var_os("PATH") {
        path.push(":");
        path.push(rest);
    }
    let out = std::process::Command::new(dormouse_bin())
        .args(["bench", "snapshot", "--runs", "2", "--clones", "2"])
        .args(["--sizes-mib", "64", "--plot"])
        .arg(&chart)
        .env("PATH", path)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running dormouse bench snapshot");
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");

    for peer in ["firecracker", "cloud-hypervisor"] {
        for case in ["64 MiB idle", "64 MiB all touched"] {
            let label = format!("{peer} {case}");
            let cells = row(&stdout, &label);
            assert_eq!(cells.len(), 8, "{label}: {cells:?}");
            let boot = ms_of(cells[1]).unwrap_or_else(|| panic!("{label}: boot {cells:?}"));
            assert!(boot > 0.0, "{label}: boot {boot}");
            let pause = ms_of(cells[2]).unwrap_or_else(|| panic!("{label}: pause {cells:?}"));
            assert!(pause > 0.0, "{label}: pause {pause}");
            let (median, _) = cells[3].split_once(" (").expect("snapshot (first)");
            let snapshot = ms_of(median).unwrap_or_else(|| panic!("{label}: {cells:?}"));
            assert!(snapshot > 0.0, "{label}: snapshot {snapshot}");
            // Both write every page of guest memory into their memory file.
            let (apparent, _) = cells[4].split_once(" / ").expect("apparent / allocated");
            let apparent = size_of(apparent).unwrap_or_else(|| panic!("{label}: {cells:?}"));
            assert!(apparent >= 64.0 * 1024.0 * 1024.0, "{label}: {apparent}");
            let restore = ms_of(cells[6]).unwrap_or_else(|| panic!("{label}: {cells:?}"));
            assert!(restore > 0.0, "{label}: restore {restore}");
            let rss = size_of(cells[7]).unwrap_or_else(|| panic!("{label}: {cells:?}"));
            assert!(rss > 1024.0 * 1024.0, "{label}: RSS {rss}");
        }
        assert!(
            stdout.contains(&format!("{peer}: found at {}", peers.join(peer).display())),
            "{stdout}"
        );
    }
    // Two rows per peer: Firecracker, Cloud Hypervisor and dormouse through its Firecracker API,
    // and QEMU's two when it is installed (its own test checks them).
    let ratios = table(&stdout, "| dormouse vs peer");
    let qemu_rows = if on_path(QEMU).is_some() { 2 } else { 0 };
    assert_eq!(ratios.len(), 6 + qemu_rows, "ratios table:\n{stdout}");
    for peer in ["dormouse-fc-api", "firecracker", "cloud-hypervisor"] {
        let rows = ratios
            .iter()
            .filter(|l| l.starts_with(&format!("| {peer} 64 MiB")))
            .count();
        assert_eq!(rows, 2, "{peer} in the ratios table:\n{stdout}");
    }
    for line in ratios {
        assert!(!line.contains(" - |"), "a ratio is missing: {line}");
        assert_eq!(line.matches('×').count(), 4, "{line}");
    }
    let svg = std::fs::read_to_string(&chart).expect("the chart");
    for series in [
        "dormouse",
        "dormouse (--mem-dir)",
        "firecracker",
        "cloud-hypervisor",
    ] {
        assert!(svg.contains(series), "no {series} series in the chart");
    }
}
