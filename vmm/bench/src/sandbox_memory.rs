//! Memory per sandbox, for `dormouse bench sandbox`: RSS and PSS (`/proc/<pid>/smaps_rollup`)
//! of the worker (this process) plus, with `Isolation::Process`, every process of each
//! sandbox's process group (the `dormouse` process, a jail's VMM child), measured with N idle
//! sandboxes restored from one template against the same measure before they started.

use std::path::Path;

/// RSS and PSS in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

impl std::ops::Add for Footprint {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            rss_kib: self.rss_kib + o.rss_kib,
            pss_kib: self.pss_kib + o.pss_kib,
        }
    }
}

/// One process's RSS and PSS (zero when it is gone or unreadable).
pub fn of_pid(pid: &str) -> Footprint {
    let text = std::fs::read_to_string(Path::new("/proc").join(pid).join("smaps_rollup"))
        .unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Footprint {
        rss_kib: field("Rss:"),
        pss_kib: field("Pss:"),
    }
}

/// Every process whose process group is `pgid`.
pub fn of_group(pgid: u32) -> Footprint {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Footprint::default();
    };
    let mut total = Footprint::default();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp …: fields after the last ')'.
        let group = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.split_whitespace().nth(2))
            .and_then(|g| g.parse::<u32>().ok());
        if group == Some(pgid) {
            total = total + of_pid(pid);
        }
    }
    total
}

/// The worker plus the given sandbox process groups.
pub fn worker_and(groups: &[u32]) -> Footprint {
    groups
        .iter()
        .fold(of_pid("self"), |acc, g| acc + of_group(*g))
}

/// `(after - before) / n`, in MiB with one decimal.
pub fn per_sandbox(before: Footprint, after: Footprint, n: usize) -> (f64, f64) {
    let n = n.max(1) as f64;
    let mib = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / 1024.0 / n;
    (
        mib(after.rss_kib, before.rss_kib),
        mib(after.pss_kib, before.pss_kib),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_footprint() {
        let me = of_pid("self");
        assert!(me.rss_kib > 0 && me.pss_kib > 0, "{me:?}");
        let (rss, pss) = per_sandbox(
            Footprint::default(),
            Footprint {
                rss_kib: 4096,
                pss_kib: 2048,
            },
            2,
        );
        assert_eq!((rss, pss), (2.0, 1.0));
    }
}
