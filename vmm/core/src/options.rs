//! Parsers for the device options the CLI takes (`--disk`, `--net`, `--vsock`), kept in the
//! library so the control API and tests share them. Format: comma-separated `key=value` items,
//! with bare flags (`ro`).
//!
//! Rate limits (docs/rate-limits.md) are `KEY=SIZE/REFILL_MS[/BURST]` items: a token bucket of
//! SIZE tokens refilled from empty in REFILL_MS milliseconds, with an optional one-time BURST.
//! Bandwidth sizes are bytes and take a binary suffix (`K`, `M`, `G`: KiB, MiB, GiB), e.g.
//! `bw=50M/1000` for 50 MiB/s; operation counts are plain numbers, e.g. `ops=1000/1000`.

use std::path::PathBuf;

use devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use devices::virtio::balloon::BalloonConfig;
use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("{option}: missing required `{key}=` (expected e.g. `{example}`)")]
    Missing {
        option: &'static str,
        key: &'static str,
        example: &'static str,
    },
    #[error("{option}: unknown item `{item}`")]
    Unknown { option: &'static str, item: String },
    #[error("{option}: `{item}` given twice")]
    Duplicate { option: &'static str, item: String },
    #[error("{option}: bad value for `{key}`: {value:?} ({why})")]
    BadValue {
        option: &'static str,
        key: String,
        value: String,
        why: &'static str,
    },
}

/// What a token bucket counts (it decides whether sizes take suffixes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketUnit {
    Bytes,
    Ops,
}

/// `SIZE/REFILL_MS[/BURST]` (see the module docs); the error says what is wrong.
pub fn parse_bucket(s: &str, unit: BucketUnit) -> Result<TokenBucketConfig, &'static str> {
    let mut parts = s.split('/');
    let (Some(size), Some(refill), burst, None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("expected SIZE/REFILL_MS or SIZE/REFILL_MS/BURST");
    };
    let size = parse_amount(size, unit)?;
    let refill_time: u64 = refill
        .strip_suffix("ms")
        .unwrap_or(refill)
        .parse()
        .map_err(|_| "REFILL_MS must be a whole number of milliseconds")?;
    let one_time_burst = burst.map(|b| parse_amount(b, unit)).transpose()?;
    if size == 0 || refill_time == 0 {
        return Err("SIZE and REFILL_MS must be above 0 (leave the key out for no limit)");
    }
    Ok(TokenBucketConfig {
        size,
        one_time_burst,
        refill_time,
    })
}

fn parse_amount(s: &str, unit: BucketUnit) -> Result<u64, &'static str> {
    let (digits, shift) = match (unit, s.as_bytes().last()) {
        (BucketUnit::Bytes, Some(b'K' | b'k')) => (&s[..s.len() - 1], 10),
        (BucketUnit::Bytes, Some(b'M' | b'm')) => (&s[..s.len() - 1], 20),
        (BucketUnit::Bytes, Some(b'G' | b'g')) => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| match unit {
        BucketUnit::Bytes => "sizes are bytes, optionally with K, M or G (binary multiples)",
        BucketUnit::Ops => "operation counts are whole numbers",
    })?;
    n.checked_mul(1 << shift).ok_or("size too large")
}

/// Sets `bucket` of `limiter` from a `KEY=SPEC` item, once.
fn set_bucket(
    slot: &mut Option<TokenBucketConfig>,
    value: &str,
    unit: BucketUnit,
    option: &'static str,
    key: &str,
) -> Result<(), OptionError> {
    let bucket = parse_bucket(value, unit).map_err(|why| OptionError::BadValue {
        option,
        key: key.into(),
        value: value.into(),
        why,
    })?;
    set_once(slot, bucket, option, key)
}

fn items(s: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    s.split(',')
        .filter(|i| !i.is_empty())
        .map(|i| match i.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (i, None),
        })
}

fn set_once<T>(
    slot: &mut Option<T>,
    value: T,
    option: &'static str,
    key: &str,
) -> Result<(), OptionError> {
    if slot.is_some() {
        return Err(OptionError::Duplicate {
            option,
            item: key.to_string(),
        });
    }
    *slot = Some(value);
    Ok(())
}

/// `path=FILE[,ro][,id=NAME][,bw=SIZE/MS[/BURST]][,ops=N/MS[/BURST]]`
pub fn parse_disk(s: &str) -> Result<BlockConfig, OptionError> {
    const OPT: &str = "--disk";
    let (mut path, mut ro, mut id) = (None, false, None);
    let mut limits = RateLimiterConfig::default();
    for (k, v) in items(s) {
        match (k, v) {
            ("path", Some(v)) if !v.is_empty() => set_once(&mut path, PathBuf::from(v), OPT, k)?,
            ("bw", Some(v)) => set_bucket(&mut limits.bandwidth, v, BucketUnit::Bytes, OPT, k)?,
            ("ops", Some(v)) => set_bucket(&mut limits.ops, v, BucketUnit::Ops, OPT, k)?,
            ("ro", None) => ro = true,
            ("id", Some(v)) => {
                if v.len() > 20 {
                    return Err(OptionError::BadValue {
                        option: OPT,
                        key: k.into(),
                        value: v.into(),
                        why: "at most 20 bytes",
                    });
                }
                set_once(&mut id, v.to_string(), OPT, k)?
            }
            _ => {
                return Err(OptionError::Unknown {
                    option: OPT,
                    item: format!("{k}{}", v.map(|v| format!("={v}")).unwrap_or_default()),
                })
            }
        }
    }
    Ok(BlockConfig {
        path: path.ok_or(OptionError::Missing {
            option: OPT,
            key: "path",
            example: "path=disk.img,ro",
        })?,
        read_only: ro,
        id,
        rate_limiter: limits,
    })
}

/// `[target_mib=N][,deflate_on_oom[=true|false]][,stats_s=N][,free_page_reporting[=true|false]]`
/// (`,` alone: the defaults). Defaults: no target, deflate on OOM and free page reporting on,
/// no statistics.
pub fn parse_balloon(s: &str) -> Result<BalloonConfig, OptionError> {
    const OPT: &str = "--balloon";
    let (mut target, mut deflate, mut stats, mut reporting) = (None, None, None, None);
    let bad = |k: &str, v: &str, why| OptionError::BadValue {
        option: OPT,
        key: k.into(),
        value: v.into(),
        why,
    };
    let flag = |k: &str, v: Option<&str>| match v {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(v) => Err(bad(k, v, "true or false")),
    };
    for (k, v) in items(s) {
        match (k, v) {
            ("target_mib", Some(v)) => {
                let n = v.parse().map_err(|_| bad(k, v, "MiB, 0 to 16777215"))?;
                if devices::virtio::balloon::Balloon::target_fits(n) {
                    set_once(&mut target, n, OPT, k)?
                } else {
                    return Err(bad(k, v, "MiB, 0 to 16777215"));
                }
            }
            ("stats_s", Some(v)) => set_once(
                &mut stats,
                v.parse().map_err(|_| bad(k, v, "seconds, 0 to 65535"))?,
                OPT,
                k,
            )?,
            ("deflate_on_oom", v) => set_once(&mut deflate, flag(k, v)?, OPT, k)?,
            ("free_page_reporting", v) => set_once(&mut reporting, flag(k, v)?, OPT, k)?,
            _ => {
                return Err(OptionError::Unknown {
                    option: OPT,
                    item: format!("{k}{}", v.map(|v| format!("={v}")).unwrap_or_default()),
                })
            }
        }
    }
    Ok(BalloonConfig {
        target_mib: target.unwrap_or(0),
        deflate_on_oom: deflate.unwrap_or(true),
        stats_interval_s: stats.unwrap_or(0),
        free_page_reporting: reporting.unwrap_or(true),
    })
}

/// `aa:bb:cc:dd:ee:ff`
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `tap=NAME[,mac=MAC][,rx_bw=…][,rx_ops=…][,tx_bw=…][,tx_ops=…]` (limits as for disks)
pub fn parse_net(s: &str) -> Result<NetConfig, OptionError> {
    const OPT: &str = "--net";
    let (mut tap, mut mac, mut fd) = (None, None, None);
    let (mut rx, mut tx) = (RateLimiterConfig::default(), RateLimiterConfig::default());
    for (k, v) in items(s) {
        match (k, v) {
            ("rx_bw", Some(v)) => set_bucket(&mut rx.bandwidth, v, BucketUnit::Bytes, OPT, k)?,
            ("rx_ops", Some(v)) => set_bucket(&mut rx.ops, v, BucketUnit::Ops, OPT, k)?,
            ("tx_bw", Some(v)) => set_bucket(&mut tx.bandwidth, v, BucketUnit::Bytes, OPT, k)?,
            ("tx_ops", Some(v)) => set_bucket(&mut tx.ops, v, BucketUnit::Ops, OPT, k)?,
            ("tap", Some(v)) => {
                if v.is_empty() || v.len() >= 16 {
                    return Err(OptionError::BadValue {
                        option: OPT,
                        key: k.into(),
                        value: v.into(),
                        why: "interface names are 1-15 bytes",
                    });
                }
                set_once(&mut tap, v.to_string(), OPT, k)?
            }
            ("fd", Some(v)) => {
                let parsed = v.parse::<i32>().ok().filter(|&n| n >= 3).ok_or_else(|| {
                    OptionError::BadValue {
                        option: OPT,
                        key: k.into(),
                        value: v.into(),
                        why: "an open TAP descriptor number, 3 or more",
                    }
                })?;
                set_once(&mut fd, parsed, OPT, k)?
            }
            ("mac", Some(v)) => {
                let parsed = parse_mac(v).ok_or_else(|| OptionError::BadValue {
                    option: OPT,
                    key: k.into(),
                    value: v.into(),
                    why: "expected six hex bytes like 02:00:00:00:00:01",
                })?;
                if parsed[0] & 1 == 1 {
                    return Err(OptionError::BadValue {
                        option: OPT,
                        key: k.into(),
                        value: v.into(),
                        why: "a multicast MAC cannot be a NIC address",
                    });
                }
                set_once(&mut mac, parsed, OPT, k)?
            }
            _ => {
                return Err(OptionError::Unknown {
                    option: OPT,
                    item: k.to_string(),
                })
            }
        }
    }
    // With fd= the TAP is already open (its name, if given, is checked against it).
    let tap = match (tap, fd) {
        (Some(tap), _) => tap,
        (None, Some(_)) => String::new(),
        (None, None) => {
            return Err(OptionError::Missing {
                option: OPT,
                key: "tap",
                example: "tap=tap0,mac=02:00:00:00:00:01",
            })
        }
    };
    Ok(NetConfig {
        tap,
        fd,
        mac,
        rx_rate_limiter: rx,
        tx_rate_limiter: tx,
        mmds: None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn balloon_options() {
        use super::parse_balloon;
        let all = parse_balloon("target_mib=64,deflate_on_oom=false,stats_s=2,free_page_reporting")
            .unwrap();
        assert_eq!(
            (
                all.target_mib,
                all.deflate_on_oom,
                all.stats_interval_s,
                all.free_page_reporting
            ),
            (64, false, 2, true)
        );
        let defaults = parse_balloon(",").unwrap();
        assert_eq!(
            (
                defaults.target_mib,
                defaults.deflate_on_oom,
                defaults.free_page_reporting
            ),
            (0, true, true)
        );
        assert!(parse_balloon("target_mib=16777216").is_err());
        assert!(parse_balloon("target_mib=-1").is_err());
        assert!(parse_balloon("stats_s=1,stats_s=2").is_err());
        assert!(parse_balloon("deflate_on_oom=yes").is_err());
        assert!(parse_balloon("size=1").is_err());
    }

    use super::*;

    #[test]
    fn disks() {
        let d = parse_disk("path=/a/b.img,ro,id=data").unwrap();
        assert_eq!(d.path, PathBuf::from("/a/b.img"));
        assert!(d.read_only);
        assert_eq!(d.id.as_deref(), Some("data"));
        assert!(!parse_disk("path=x").unwrap().read_only);
        assert!(matches!(parse_disk("ro"), Err(OptionError::Missing { .. })));
        assert!(matches!(
            parse_disk("path=a,path=b"),
            Err(OptionError::Duplicate { .. })
        ));
        assert!(matches!(
            parse_disk("path=a,rw"),
            Err(OptionError::Unknown { .. })
        ));
        assert!(matches!(
            parse_disk("path=a,id=012345678901234567890"),
            Err(OptionError::BadValue { .. })
        ));
    }

    #[test]
    fn rate_limits() {
        let d = parse_disk("path=a,bw=50M/1000,ops=200/100/1000").unwrap();
        assert_eq!(
            d.rate_limiter.bandwidth,
            Some(TokenBucketConfig {
                size: 50 << 20,
                one_time_burst: None,
                refill_time: 1000
            })
        );
        assert_eq!(
            d.rate_limiter.ops,
            Some(TokenBucketConfig {
                size: 200,
                one_time_burst: Some(1000),
                refill_time: 100
            })
        );
        assert!(!parse_disk("path=a").unwrap().rate_limiter.is_limiting());
        let b = parse_bucket("4k/10ms/1G", BucketUnit::Bytes).unwrap();
        assert_eq!(
            (b.size, b.refill_time, b.one_time_burst),
            (4096, 10, Some(1 << 30))
        );
        let n = parse_net("tap=t,rx_bw=10M/1000,tx_ops=100/1000").unwrap();
        assert_eq!(n.rx_rate_limiter.bandwidth.unwrap().size, 10 << 20);
        assert_eq!(n.rx_rate_limiter.ops, None);
        assert_eq!(n.tx_rate_limiter.ops.unwrap().size, 100);
        assert_eq!(n.tx_rate_limiter.bandwidth, None);
        for bad in [
            "path=a,bw=50M",
            "path=a,bw=50M/",
            "path=a,bw=0/1000",
            "path=a,bw=50M/0",
            "path=a,bw=50X/1000",
            "path=a,bw=50M/1000/2/3",
            "path=a,ops=1K/1000",
            "path=a,bw=99999999999G/1000",
            "path=a,bw=-1/1000",
        ] {
            let err = parse_disk(bad).unwrap_err();
            assert!(matches!(err, OptionError::BadValue { .. }), "{bad}: {err}");
        }
        assert!(matches!(
            parse_disk("path=a,bw=1M/10,bw=2M/10"),
            Err(OptionError::Duplicate { .. })
        ));
        assert!(matches!(
            parse_net("tap=t,bw=1M/10"),
            Err(OptionError::Unknown { .. })
        ));
        let msg = parse_disk("path=a,bw=0/1000").unwrap_err().to_string();
        assert!(msg.contains("leave the key out"), "{msg}");
    }

    #[test]
    fn nets_and_macs() {
        let n = parse_net("tap=tap0,mac=02:AB:00:00:00:01").unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some([2, 0xab, 0, 0, 0, 1]));
        assert_eq!(format_mac(&[2, 0xab, 0, 0, 0, 1]), "02:ab:00:00:00:01");
        assert!(parse_net("mac=02:00:00:00:00:01").is_err());
        assert!(parse_net("tap=").is_err());
        let n = parse_net("fd=5,mac=02:00:00:00:00:01").unwrap();
        assert_eq!((n.tap.as_str(), n.fd), ("", Some(5)));
        let n = parse_net("tap=tap1,fd=7").unwrap();
        assert_eq!((n.tap.as_str(), n.fd), ("tap1", Some(7)));
        assert_eq!(parse_net("tap=t").unwrap().fd, None);
        for bad in ["fd=2", "fd=-1", "fd=x", "fd="] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            parse_net("fd=3,fd=4"),
            Err(OptionError::Duplicate { .. })
        ));
        assert!(parse_net("tap=abcdefghijklmnop").is_err());
        assert!(parse_net("tap=t,mac=01:00:00:00:00:00").is_err());
        for bad in [
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "zz:00:00:00:00:00",
            "2:0:0:0:0:0",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
