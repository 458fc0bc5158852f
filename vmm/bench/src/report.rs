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

    #[test]
    fn sizes_print_in_kib_then_mib() {
        assert_eq!(bytes(512 << 10), "512 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(kib(2048), "2.0 MiB");
    }
}
