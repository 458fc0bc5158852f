//! Firecracker's balloon bodies ↔ dormouse's balloon: what can be honoured (a 400 saying why
//! otherwise), and the answers of `GET /balloon` and `GET /balloon/statistics`.

use devices::virtio::balloon::{BalloonConfig, BalloonStatus, PAGES_PER_MIB};

use super::error::FcError;
use super::types::{Balloon, BalloonStats};

/// A statistics interval as the device takes it (Firecracker's is a signed integer).
pub fn stats_interval(seconds: i64) -> Result<u16, FcError> {
    u16::try_from(seconds).map_err(|_| {
        FcError::bad(format!(
            "stats_polling_interval_s must be 0 to {} seconds, got {seconds}",
            u16::MAX
        ))
    })
}

/// The device configuration of a `PUT /balloon`.
pub fn config(balloon: &Balloon) -> Result<BalloonConfig, FcError> {
    if balloon.free_page_hinting == Some(true) {
        return Err(FcError::unsupported(
            "free_page_hinting",
            "dormouse's balloon offers free page reporting (free_page_reporting) instead",
        ));
    }
    if !devices::virtio::balloon::Balloon::target_fits(balloon.amount_mib) {
        return Err(FcError::bad(format!(
            "amount_mib {} is too large",
            balloon.amount_mib
        )));
    }
    Ok(BalloonConfig {
        target_mib: balloon.amount_mib,
        deflate_on_oom: balloon.deflate_on_oom,
        stats_interval_s: stats_interval(balloon.stats_polling_interval_s)?,
        free_page_reporting: balloon.free_page_reporting.unwrap_or(false),
    })
}

/// `GET /balloon` of a running VM.
pub fn describe(status: &BalloonStatus) -> Balloon {
    let config = status.config;
    Balloon {
        amount_mib: config.target_mib,
        deflate_on_oom: config.deflate_on_oom,
        stats_polling_interval_s: i64::from(config.stats_interval_s),
        free_page_hinting: Some(false),
        free_page_reporting: Some(config.free_page_reporting),
    }
}

/// `GET /balloon/statistics`; 400 when statistics are off (as Firecracker).
pub fn statistics(status: &BalloonStatus) -> Result<BalloonStats, FcError> {
    if status.config.stats_interval_s == 0 {
        return Err(FcError::bad(
            "Statistics for the balloon device are not enabled",
        ));
    }
    let per_mib = PAGES_PER_MIB as u32;
    Ok(BalloonStats {
        target_pages: status.target_pages,
        actual_pages: status.actual_pages,
        target_mib: status.target_pages / per_mib,
        actual_mib: status.actual_pages / per_mib,
        stats: status.stats.iter().map(|s| (s.name(), s.value)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_cannot_be_honoured_is_refused_with_a_reason() {
        let mut b = Balloon {
            amount_mib: 64,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            free_page_hinting: None,
            free_page_reporting: Some(true),
        };
        let c = config(&b).unwrap();
        assert_eq!(
            (c.target_mib, c.stats_interval_s, c.free_page_reporting),
            (64, 1, true)
        );
        b.free_page_hinting = Some(true);
        assert!(config(&b)
            .unwrap_err()
            .to_string()
            .contains("free page reporting"));
        b.free_page_hinting = None;
        b.stats_polling_interval_s = -1;
        assert!(config(&b).is_err());
        b.stats_polling_interval_s = 70_000;
        assert!(config(&b).is_err());
    }

    #[test]
    fn statistics_need_an_interval_and_name_each_stat() {
        let mut status = BalloonStatus {
            target_pages: 512,
            actual_pages: 256,
            ..BalloonStatus::default()
        };
        assert!(statistics(&status).is_err());
        status.config.stats_interval_s = 1;
        status.stats = vec![devices::virtio::balloon::Stat { tag: 4, value: 99 }];
        let json = serde_json::to_value(statistics(&status).unwrap()).unwrap();
        assert_eq!(json["free_memory"], 99);
        assert_eq!(json["target_mib"], 2);
        assert_eq!(json["actual_mib"], 1);
    }
}
