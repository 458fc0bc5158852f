//! Parsers for the device options the CLI takes (`--disk`, `--net`, `--vsock`), kept in the
//! library so the control API and tests share them. Format: comma-separated `key=value` items,
//! with bare flags (`ro`).

use std::path::PathBuf;

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

/// `path=FILE[,ro][,id=NAME]`
pub fn parse_disk(s: &str) -> Result<BlockConfig, OptionError> {
    const OPT: &str = "--disk";
    let (mut path, mut ro, mut id) = (None, false, None);
    for (k, v) in items(s) {
        match (k, v) {
            ("path", Some(v)) if !v.is_empty() => set_once(&mut path, PathBuf::from(v), OPT, k)?,
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

/// `tap=NAME[,mac=MAC]`
pub fn parse_net(s: &str) -> Result<NetConfig, OptionError> {
    const OPT: &str = "--net";
    let (mut tap, mut mac) = (None, None);
    for (k, v) in items(s) {
        match (k, v) {
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
    Ok(NetConfig {
        tap: tap.ok_or(OptionError::Missing {
            option: OPT,
            key: "tap",
            example: "tap=tap0,mac=02:00:00:00:00:01",
        })?,
        mac,
    })
}

#[cfg(test)]
mod tests {
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
    fn nets_and_macs() {
        let n = parse_net("tap=tap0,mac=02:AB:00:00:00:01").unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some([2, 0xab, 0, 0, 0, 1]));
        assert_eq!(format_mac(&[2, 0xab, 0, 0, 0, 1]), "02:ab:00:00:00:01");
        assert!(parse_net("mac=02:00:00:00:00:01").is_err());
        assert!(parse_net("tap=").is_err());
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
