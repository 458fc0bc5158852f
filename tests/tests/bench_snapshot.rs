//! `dormouse bench snapshot` runs end to end and prints its tables with figures in every cell
//! (the warm-shell rows included).
//! Tiny guest only, small sizes and counts: it checks the benchmark works, not how fast things
//! are (the figures are for people to read; targets are printed, not asserted).

use std::time::Duration;

use tests::*;

/// "12.3 MiB" / "512 KiB" → bytes.
fn size_of(cell: &str) -> Option<f64> {
    let (number, unit) = cell.trim().split_once(' ')?;
    let n: f64 = number.parse().ok()?;
    let scale = match unit {
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        _ => return None,
    };
    Some(n * scale)
}

/// "1.25 ms" → milliseconds (the first such figure in the cell).
fn ms_of(cell: &str) -> Option<f64> {
    cell.split_whitespace().next()?.parse().ok()
}

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

#[test]
fn bench_snapshot_prints_every_figure_for_the_tiny_guest() {
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

    let mut allocated = Vec::new();
    for label in ["tiny 64 MiB idle", "tiny 64 MiB all touched"] {
        let cells = row(&stdout, label);
        assert_eq!(cells.len(), 7, "{cells:?}");
        // pause, snapshot (first), restore in VMM, process start → running: times in ms.
        for i in [1, 2, 4, 5] {
            let t = ms_of(cells[i]).unwrap_or_else(|| panic!("{label}: cell {i} {:?}", cells[i]));
            assert!(t > 0.0 && t < 60_000.0, "{label}: cell {i} {t} ms");
            assert!(cells[i].contains("ms"), "{label}: {:?}", cells[i]);
        }
        let (apparent, alloc) = cells[3].split_once(" / ").expect("apparent / allocated");
        assert_eq!(size_of(apparent), Some(64.0 * 1024.0 * 1024.0), "{label}");
        allocated.push(size_of(alloc).unwrap_or_else(|| panic!("{label}: {alloc:?}")));
        let rss = size_of(cells[6]).unwrap_or_else(|| panic!("{label}: RSS {:?}", cells[6]));
        assert!(rss > 0.0, "{label}: RSS {rss}");
    }
    // The idle guest's memory file is sparse; the touching guest's holds every page it wrote.
    assert!(
        allocated[0] < 1024.0 * 1024.0,
        "idle: {} bytes allocated",
        allocated[0]
    );
    assert!(
        allocated[1] > 60.0 * 1024.0 * 1024.0,
        "touched: {} bytes allocated",
        allocated[1]
    );

    // The clone table has a row per guest with summed figures.
    let clone_rows: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("| 2 clones"))
        .filter(|l| l.starts_with("| tiny 64 MiB"))
        .collect();
    assert_eq!(clone_rows.len(), 2, "{stdout}");
    for line in clone_rows {
        assert!(line.matches("iB").count() >= 5, "{line}");
    }
    // File-backed RAM rows: same columns; their snapshots link the memory file.
    let touched = row(&stdout, "tiny (--mem-dir) 64 MiB all touched");
    assert_eq!(touched.len(), 7, "{touched:?}");
    let (apparent, _) = touched[3].split_once(" / ").expect("apparent / allocated");
    assert_eq!(size_of(apparent), Some(64.0 * 1024.0 * 1024.0));
    let modes = row(&stdout, "64 MiB all touched");
    assert_eq!(modes.len(), 4, "{modes:?}");
    assert_eq!(modes[3], "linked", "{stdout}");
    assert!(stdout.contains("| restore ≤ 3.00 ms"), "{stdout}");
    // The idle guest's restore as is, with --seccomp off, and jailed (root only).
    assert!(
        stdout.contains("| restore of tiny 64 MiB idle (2 runs, interleaved)"),
        "{stdout}"
    );
    for label in ["as is (seccomp enforcing)", "--seccomp off"] {
        let cells = row(&stdout, label);
        assert!(
            ms_of(cells[1]).is_some() && ms_of(cells[2]).is_some(),
            "{cells:?}"
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let cells = row(&stdout, "jailed (`dormouse jail … -- restore`)");
        assert!(ms_of(cells[2]).is_some(), "{cells:?}");
    } else {
        assert!(
            stdout.contains("| jailed | skipped (needs root)"),
            "{stdout}"
        );
    }
    // Restores into a warm VM shell, in the bench's process, next to fresh ones.
    for label in ["tiny 64 MiB idle", "tiny 64 MiB all touched"] {
        let cells = row(&stdout, &format!("warm shell: {label}"));
        assert_eq!(cells.len(), 5, "{cells:?}");
        for i in [1, 2, 4] {
            let t = ms_of(cells[i]).unwrap_or_else(|| panic!("{label}: cell {i} {:?}", cells[i]));
            assert!(t > 0.0 && t < 60_000.0, "{label}: cell {i} {t} ms");
        }
        assert!(cells[3] == "met" || cells[3] == "MISSED", "{cells:?}");
    }
    let idle = row(&stdout, "idle shells: 64 MiB");
    assert_eq!(idle.len(), 4, "{idle:?}");
    for cell in &idle[1..] {
        assert!(size_of(cell).is_some(), "{idle:?}");
    }
    for peer in ["firecracker", "cloud-hypervisor", "qemu-system-x86_64"] {
        assert!(stdout.contains(&format!("{peer}: ")), "{stdout}");
    }
}
