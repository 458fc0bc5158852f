//! `dormouse bench boot` runs end to end with the tiny guest and prints every figure, baselines
//! included. It checks the benchmark works and its figures are consistent, not how fast things
//! are (targets are printed for people, not asserted).

use std::time::Duration;

use tests::*;

/// The cells of the row whose label starts with `label`.
fn row<'a>(stdout: &'a str, label: &str) -> Vec<&'a str> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("| {label}")))
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{stdout}"));
    line.split('|')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// "1.25 ms" / "0.88 MiB" → 1.25 / 0.88.
fn number(cell: &str) -> f64 {
    cell.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in cell {cell:?}"))
}

#[test]
fn bench_boot_prints_start_exit_rss_and_baselines() {
    if !require_kvm() {
        return;
    }
    // Six runs: the fewest that give seccomp's paired cost an interval.
    let out = run_dormouse(&["bench", "boot", "--runs", "6"], Duration::from_secs(300));
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");

    let mut medians = Vec::new();
    for label in [
        "process start → first serial output",
        "process start → process exit",
        "baseline: process spawn",
        "baseline: in-process KVM VM",
    ] {
        let cells = row(&stdout, label);
        let (min, median) = (number(cells[1]), number(cells[2]));
        assert!(min > 0.0 && min <= median, "{label}: {cells:?}");
        medians.push(median);
    }
    // Each run's first output comes before its exit, so the medians keep that order.
    assert!(medians[0] <= medians[1], "{medians:?}");

    let rss = row(&stdout, "idle VMM RSS");
    let total_mib = number(rss[1]);
    assert!(total_mib > 0.1 && total_mib < 64.0, "{rss:?}");
    assert!(stdout.contains("dormouse above both baselines"), "{stdout}");

    // Same-run rows: the cost of seccomp, and of the jail (root only).
    for label in [
        "process start → first serial output, --seccomp off",
        "process start → process exit, --seccomp off",
    ] {
        let cells = row(&stdout, label);
        let (min, median) = (number(cells[1]), number(cells[2]));
        assert!(min > 0.0 && min <= median, "{label}: {cells:?}");
    }
    // seccomp's cost pair by pair: a median inside its interval, and a verdict.
    let cost = row(&stdout, "seccomp's cost to first output");
    let (median, interval) = cost[1].split_once(" ms [").expect("median ms [low, high]");
    let (low, rest) = interval.split_once(", ").expect("low, high");
    let (high, verdict) = rest.split_once("]: ").expect("interval and verdict");
    let (median, low, high) = (number(median), number(low), number(high));
    assert!(low <= median && median <= high, "{cost:?}");
    assert!(
        ["measurable", "not measurable"].contains(&verdict),
        "{cost:?}"
    );
    assert!(["met", "MISSED"].contains(&cost[2]), "{cost:?}");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    for label in [
        "process start → first serial output, jailed",
        "process start → process exit, jailed",
    ] {
        let cells = row(&stdout, label);
        if root {
            let (min, median) = (number(cells[1]), number(cells[2]));
            assert!(min > 0.0 && min <= median, "{label}: {cells:?}");
        } else {
            assert_eq!(cells[1], "skipped (needs root)", "{label}");
        }
    }
}
