//! `--vsock cid=N[,uds=PATH][,backend=auto|vhost|userspace]` and the datapath choice.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::defs::{MAX_GUEST_CID, MIN_GUEST_CID};

pub const VHOST_VSOCK_DEV: &str = "/dev/vhost-vsock";

/// What the user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// vhost-kernel when `/dev/vhost-vsock` is usable and nothing needs userspace.
    #[default]
    Auto,
    Vhost,
    Userspace,
}

/// What actually runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Datapath {
    Vhost,
    Userspace,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub guest_cid: u64,
    /// Hybrid Unix-socket backend (Firecracker protocol); needs the userspace datapath.
    pub uds_path: Option<PathBuf>,
    pub backend: BackendChoice,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("vsock option {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("unknown vsock option {0:?} (expected cid, uds, backend)")]
    UnknownKey(String),
    #[error("vsock cid {0:?} is not a number")]
    BadCid(String),
    #[error("vsock cid {0} is out of range ({MIN_GUEST_CID}..={MAX_GUEST_CID})")]
    CidOutOfRange(u64),
    #[error("vsock needs cid=N")]
    MissingCid,
    #[error("vsock backend {0:?} is not auto, vhost or userspace")]
    BadBackend(String),
    #[error("vsock option {0} given twice")]
    Duplicate(&'static str),
    #[error(
        "vsock backend=vhost cannot serve uds= (the hybrid socket needs the userspace datapath)"
    )]
    VhostWithUds,
    #[error("vsock backend=vhost requested but {VHOST_VSOCK_DEV} is not usable")]
    VhostUnavailable,
}

impl VsockConfig {
    pub fn new(guest_cid: u64) -> Result<Self, ConfigError> {
        validate_cid(guest_cid)?;
        Ok(Self {
            guest_cid,
            uds_path: None,
            backend: BackendChoice::Auto,
        })
    }

    /// Which datapath this config runs on a host where vhost-vsock is (or is not) usable.
    pub fn select_datapath(&self, vhost_usable: bool) -> Result<Datapath, ConfigError> {
        select_datapath(self.backend, self.uds_path.is_some(), vhost_usable)
    }
}

pub(super) fn validate_cid(cid: u64) -> Result<(), ConfigError> {
    if (MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
        Ok(())
    } else {
        Err(ConfigError::CidOutOfRange(cid))
    }
}

/// Pure selection logic. `needs_userspace` is true when a userspace-only backend (the hybrid
/// Unix socket) is configured. In-process connections (`VsockHandle`) also need userspace: a
/// caller relying on them asks for `backend=userspace`.
pub fn select_datapath(
    choice: BackendChoice,
    needs_userspace: bool,
    vhost_usable: bool,
) -> Result<Datapath, ConfigError> {
    match choice {
        BackendChoice::Userspace => Ok(Datapath::Userspace),
        BackendChoice::Vhost if needs_userspace => Err(ConfigError::VhostWithUds),
        BackendChoice::Vhost if !vhost_usable => Err(ConfigError::VhostUnavailable),
        BackendChoice::Vhost => Ok(Datapath::Vhost),
        BackendChoice::Auto if vhost_usable && !needs_userspace => Ok(Datapath::Vhost),
        BackendChoice::Auto => Ok(Datapath::Userspace),
    }
}

/// Whether `/dev/vhost-vsock` (or `dev` in tests) can be opened read-write.
pub fn vhost_usable(dev: &Path) -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .is_ok()
}

impl FromStr for VsockConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cid = None;
        let mut uds_path = None;
        let mut backend = None;
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue(part.into()))?;
            match key {
                "cid" => {
                    let v: u64 = value
                        .parse()
                        .map_err(|_| ConfigError::BadCid(value.into()))?;
                    if cid.replace(v).is_some() {
                        return Err(ConfigError::Duplicate("cid"));
                    }
                }
                "uds" => {
                    if uds_path.replace(PathBuf::from(value)).is_some() {
                        return Err(ConfigError::Duplicate("uds"));
                    }
                }
                "backend" => {
                    let b = match value {
                        "auto" => BackendChoice::Auto,
                        "vhost" => BackendChoice::Vhost,
                        "userspace" => BackendChoice::Userspace,
                        _ => return Err(ConfigError::BadBackend(value.into())),
                    };
                    if backend.replace(b).is_some() {
                        return Err(ConfigError::Duplicate("backend"));
                    }
                }
                _ => return Err(ConfigError::UnknownKey(key.into())),
            }
        }
        let guest_cid = cid.ok_or(ConfigError::MissingCid)?;
        validate_cid(guest_cid)?;
        let backend = backend.unwrap_or_default();
        if backend == BackendChoice::Vhost && uds_path.is_some() {
            return Err(ConfigError::VhostWithUds);
        }
        Ok(Self {
            guest_cid,
            uds_path,
            backend,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cli_forms() {
        let c: VsockConfig = "cid=3".parse().unwrap();
        assert_eq!(c, VsockConfig::new(3).unwrap());
        let c: VsockConfig = "cid=42,uds=/tmp/v.sock,backend=userspace".parse().unwrap();
        assert_eq!(c.guest_cid, 42);
        assert_eq!(c.uds_path.as_deref(), Some(Path::new("/tmp/v.sock")));
        assert_eq!(c.backend, BackendChoice::Userspace);
        assert_eq!(
            "backend=vhost,cid=7"
                .parse::<VsockConfig>()
                .unwrap()
                .backend,
            BackendChoice::Vhost
        );
    }

    #[test]
    fn rejects_bad_options() {
        let err = |s: &str| s.parse::<VsockConfig>().unwrap_err();
        assert_eq!(err("uds=/x"), ConfigError::MissingCid);
        assert_eq!(err("cid=2"), ConfigError::CidOutOfRange(2));
        assert_eq!(
            err("cid=4294967295"),
            ConfigError::CidOutOfRange(u32::MAX as u64)
        );
        assert_eq!(err("cid=x"), ConfigError::BadCid("x".into()));
        assert_eq!(err("cid=3,foo=1"), ConfigError::UnknownKey("foo".into()));
        assert_eq!(err("cid=3,cid=4"), ConfigError::Duplicate("cid"));
        assert_eq!(
            err("cid=3,backend=fast"),
            ConfigError::BadBackend("fast".into())
        );
        assert_eq!(err("cid=3,uds"), ConfigError::NotKeyValue("uds".into()));
        assert_eq!(err("cid=3,uds=/x,backend=vhost"), ConfigError::VhostWithUds);
    }

    #[test]
    fn datapath_selection() {
        use BackendChoice::*;
        use Datapath as D;
        // (choice, needs userspace, vhost usable) -> result
        assert_eq!(select_datapath(Auto, false, true), Ok(D::Vhost));
        assert_eq!(select_datapath(Auto, false, false), Ok(D::Userspace));
        assert_eq!(select_datapath(Auto, true, true), Ok(D::Userspace));
        assert_eq!(select_datapath(Userspace, false, true), Ok(D::Userspace));
        assert_eq!(select_datapath(Vhost, false, true), Ok(D::Vhost));
        assert_eq!(
            select_datapath(Vhost, false, false),
            Err(ConfigError::VhostUnavailable)
        );
        assert_eq!(
            select_datapath(Vhost, true, true),
            Err(ConfigError::VhostWithUds)
        );
    }

    #[test]
    fn vhost_probe_reports_missing_device() {
        assert!(!vhost_usable(Path::new("/nonexistent/vhost-vsock")));
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(vhost_usable(f.path()));
    }
}
