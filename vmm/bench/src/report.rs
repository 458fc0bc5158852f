//! How every bench suite reports: sample statistics and the units its tables print (times in
//! milliseconds, sizes in KiB/MiB). One module so all tables read alike.

use std::time::Duration;

const MIB: u64 = 1 << 20;

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

/// What a variant costs over a baseline measured in alternation with it: the median of the
/// per-pair differences `with[i] - without[i]` (pairs share the host's state of the moment,
/// which a difference of two separate medians does not) and a distribution-free 95 % interval
/// for that median (order statistics of the sorted differences).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedCost {
    /// Milliseconds; negative when the variant was faster.
    pub median_ms: f64,
    pub low_ms: f64,
    pub high_ms: f64,
}

impl PairedCost {
    /// No cost can be told from noise: the interval contains zero.
    pub fn measurable(&self) -> bool {
        self.low_ms > 0.0 || self.high_ms < 0.0
    }
}

/// [`PairedCost`] of `with` over `without` (same length, at least 6 pairs: fewer give no 95 %
/// interval).
pub fn paired_cost(with: &[Duration], without: &[Duration]) -> Option<PairedCost> {
    if with.len() != without.len() || with.len() < 6 {
        return None;
    }
    let mut diffs: Vec<f64> = with
        .iter()
        .zip(without)
        .map(|(a, b)| (a.as_secs_f64() - b.as_secs_f64()) * 1e3)
        .collect();
    diffs.sort_by(f64::total_cmp);
    let n = diffs.len();
    // The median's rank is Binomial(n, 1/2): ±1.96 standard deviations (sqrt(n)/2) around n/2.
    let half_width = 0.98 * (n as f64).sqrt();
    let low = ((n as f64 / 2.0 - half_width).floor() as usize).min(n - 1);
    let high = ((n as f64 / 2.0 + half_width).ceil() as usize).min(n - 1);
    let median = if n.is_multiple_of(2) {
        (diffs[n / 2 - 1] + diffs[n / 2]) / 2.0
    } else {
        diffs[n / 2]
    };
    Some(PairedCost {
        median_ms: median,
        low_ms: diffs[low],
        high_ms: diffs[high],
    })
}

/// `+0.12 ms [−0.05, +0.30]: not measurable` / `… : measurable`.
pub fn paired(cost: &PairedCost) -> String {
    format!(
        "{:+.2} ms [{:+.2}, {:+.2}]: {}",
        cost.median_ms,
        cost.low_ms,
        cost.high_ms,
        if cost.measurable() {
            "measurable"
        } else {
            "not measurable"
        }
    )
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub fn bytes(n: u64) -> String {
    if n < MIB {
        format!("{:.0} KiB", n as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", n as f64 / MIB as f64)
    }
}

pub fn kib(n: u64) -> String {
    bytes(n.saturating_mul(1024))
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

    fn millis(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_micros(m * 100)).collect()
    }

    #[test]
    fn a_constant_cost_is_measurable_and_noise_is_not() {
        // Every pair 0.5 ms apart: the interval is that, well away from zero.
        let base = millis(&[30, 31, 29, 35, 30, 28, 33, 31, 30, 29, 32, 30]);
        let slower: Vec<Duration> = base
            .iter()
            .map(|d| *d + Duration::from_micros(500))
            .collect();
        let cost = paired_cost(&slower, &base).unwrap();
        assert!((cost.median_ms - 0.5).abs() < 1e-9, "{cost:?}");
        assert!(cost.measurable());
        assert!(paired(&cost).ends_with(": measurable"), "{}", paired(&cost));
        // Differences scattered on both sides of zero: not measurable.
        let other = millis(&[31, 30, 30, 34, 31, 27, 34, 30, 31, 28, 33, 29]);
        let cost = paired_cost(&other, &base).unwrap();
        assert!(cost.low_ms < 0.0 && cost.high_ms > 0.0, "{cost:?}");
        assert!(!cost.measurable());
        // A faster variant is measurable too (a negative cost).
        let cost = paired_cost(&base, &slower).unwrap();
        assert!(cost.measurable() && cost.median_ms < 0.0);
    }

    #[test]
    fn too_few_or_unpaired_samples_give_no_interval() {
        let five = millis(&[1, 2, 3, 4, 5]);
        assert!(paired_cost(&five, &five).is_none());
        let six = millis(&[1, 2, 3, 4, 5, 6]);
        assert!(paired_cost(&six, &five).is_none());
        assert!(paired_cost(&six, &six).is_some());
    }

    #[test]
    fn sizes_print_in_kib_then_mib() {
        assert_eq!(bytes(512 << 10), "512 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(kib(2048), "2.0 MiB");
    }
}
