//! What a jail is asked to be, and the validation of every part that comes from the command line.

use std::path::{Component, Path, PathBuf};

use crate::{JailError, Result};

/// Where jails live unless `--chroot-base` says otherwise (Firecracker's jailer uses /srv/jailer).
pub const DEFAULT_CHROOT_BASE: &str = "/srv/dormouse";
/// The cgroup every jail's cgroup is created under, unless `--cgroup-parent` says otherwise.
pub const DEFAULT_CGROUP_PARENT: &str = "dormouse";
const MAX_ID_LEN: usize = 64;

/// A jail id: `[A-Za-z0-9-]{1,64}`, not starting with `-`. It names a directory and a cgroup.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('-')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(JailError::InvalidId(id.to_string()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// One `--cgroup FILE=VALUE`: the file `controller.name` of the jail's cgroup gets `value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupSetting {
    pub file: String,
    pub value: String,
}

impl CgroupSetting {
    /// The controller the file belongs to (`memory` for `memory.max`).
    pub fn controller(&self) -> &str {
        self.file.split('.').next().unwrap_or("")
    }
}

/// Parses `controller.name=value`. The file name is one path component of letters, digits, `_`
/// and `.` (so no `/`, no `..`), with a controller prefix; the value holds no newline (one write,
/// one setting).
pub fn parse_cgroup_setting(s: &str) -> Result<CgroupSetting> {
    let bad = |why| JailError::BadCgroup {
        setting: s.to_string(),
        why,
    };
    let (file, value) = s.split_once('=').ok_or(bad("expected FILE=VALUE"))?;
    let (controller, name) = file
        .split_once('.')
        .ok_or(bad("the file must be controller.name, e.g. memory.max"))?;
    let word = |w: &str| {
        !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    };
    if !word(controller) || controller.contains('.') || !word(name) || name.contains("..") {
        return Err(bad(
            "the file must be controller.name of letters, digits, '_' and '.' (no '/', no '..')",
        ));
    }
    if controller == "cgroup" {
        return Err(bad("cgroup.* files are the jail's to write"));
    }
    if value.is_empty() || value.contains(['\n', '\r', '\0']) {
        return Err(bad("the value must be non-empty, on one line"));
    }
    Ok(CgroupSetting {
        file: file.to_string(),
        value: value.to_string(),
    })
}

/// `--cgroup-parent`: a relative cgroup path of plain components (`dormouse`, `tenants/a`).
pub fn validate_cgroup_parent(name: &str) -> Result<()> {
    let bad = |why| JailError::BadCgroupParent {
        name: name.to_string(),
        why,
    };
    if name.is_empty() || name.len() > 255 {
        return Err(bad("1 to 255 characters"));
    }
    for part in name.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(bad("relative, without empty, '.' or '..' components"));
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(bad("components of A-Z, a-z, 0-9, '-', '_' and '.'"));
        }
    }
    Ok(())
}

/// Resource limits set on the VMM process (soft and hard alike).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rlimits {
    /// RLIMIT_NOFILE: open descriptors.
    pub nofile: Option<u64>,
    /// RLIMIT_FSIZE: the largest file the VMM may write, in bytes. A write beyond it fails with
    /// EFBIG (the jail ignores SIGXFSZ, so it does not kill the VMM).
    pub fsize: Option<u64>,
}

/// Parses `nofile=N,fsize=N` into `limits` (repeatable; a resource named twice is refused).
pub fn parse_rlimits(s: &str, limits: &mut Rlimits) -> Result<()> {
    for item in s.split(',') {
        let bad = |why| JailError::BadRlimit {
            item: item.to_string(),
            why,
        };
        let (key, value) = item.split_once('=').ok_or(bad("expected NAME=N"))?;
        let value: u64 = value
            .parse()
            .map_err(|_| bad("the value must be a decimal number"))?;
        let slot = match key {
            "nofile" => {
                if value < 16 {
                    return Err(bad("nofile below 16 leaves the VMM unable to start"));
                }
                &mut limits.nofile
            }
            "fsize" => &mut limits.fsize,
            _ => return Err(bad("known limits: nofile, fsize")),
        };
        if slot.replace(value).is_some() {
            return Err(bad("given twice"));
        }
    }
    Ok(())
}

/// Everything `dormouse jail` was asked for, validated by [`JailSpec::validate`].
#[derive(Clone, Debug)]
pub struct JailSpec {
    pub id: String,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
    /// A network namespace to join (`/var/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    pub cgroup_version: CgroupVersion,
    pub cgroups: Vec<CgroupSetting>,
    pub cgroup_parent: String,
    pub rlimits: Rlimits,
    pub new_pid_ns: bool,
    pub daemonize: bool,
    /// Empty directories made in the root for the VMM (owned by uid/gid), e.g. `run` for
    /// Firecracker's default API socket `/run/firecracker.socket`.
    pub vmm_dirs: Vec<String>,
    /// A file in the root the supervisor writes the VMM's pid to (as seen from the host), as
    /// Firecracker's jailer writes `<exec_file_name>.pid`.
    pub pid_file: Option<String>,
}

impl JailSpec {
    pub fn new(id: &str, uid: u32, gid: u32) -> Self {
        Self {
            id: id.to_string(),
            uid,
            gid,
            chroot_base: PathBuf::from(DEFAULT_CHROOT_BASE),
            netns: None,
            cgroup_version: CgroupVersion::V1,
            cgroups: Vec::new(),
            cgroup_parent: DEFAULT_CGROUP_PARENT.to_string(),
            rlimits: Rlimits::default(),
            new_pid_ns: false,
            daemonize: false,
            vmm_dirs: Vec::new(),
            pid_file: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        validate_id(&self.id)?;
        if self.uid == 0 {
            return Err(JailError::RootId("uid"));
        }
        if self.gid == 0 {
            return Err(JailError::RootId("gid"));
        }
        check_absolute(&self.chroot_base)?;
        if self.chroot_base == Path::new("/") {
            return Err(JailError::BadPath {
                path: self.chroot_base.clone(),
                why: "the chroot base cannot be /",
            });
        }
        if let Some(netns) = &self.netns {
            check_absolute(netns)?;
        }
        validate_cgroup_parent(&self.cgroup_parent)?;
        for name in self.vmm_dirs.iter().chain(&self.pid_file) {
            check_file_name(name)?;
        }
        Ok(())
    }

    /// `<base>/<id>`: the jail's own directory (lock file, `root/`).
    pub fn jail_dir(&self) -> PathBuf {
        self.chroot_base.join(&self.id)
    }

    /// `<base>/<id>/root`: the VMM's `/`.
    pub fn root_dir(&self) -> PathBuf {
        self.jail_dir().join("root")
    }
}

/// One plain name (no `/`, not `.` or `..`, not empty): a file or directory right in the root.
fn check_file_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(JailError::BadPath {
            path: PathBuf::from(name),
            why: "must be a plain file name",
        });
    }
    Ok(())
}

/// An absolute path without `.`/`..` components or NUL bytes.
pub fn check_absolute(path: &Path) -> Result<()> {
    let bad = |why| JailError::BadPath {
        path: path.to_path_buf(),
        why,
    };
    if !path.is_absolute() {
        return Err(bad("must be absolute"));
    }
    if path
        .as_os_str()
        .as_encoded_bytes()
        .split(|&b| b == b'/')
        .any(|part| part == b"." || part == b"..")
    {
        return Err(bad("must not contain '.' or '..'"));
    }
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(bad("contains a NUL byte"));
    }
    Ok(())
}

/// Where a path given to the VMM inside the jail is on the host: `<root>/<path>` (a relative
/// path is relative to the jail's `/`, the VMM's working directory).
pub fn host_path_of(root: &Path, in_jail: &Path) -> PathBuf {
    let rel: PathBuf = in_jail
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    root.join(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["a", "vm-1", "A0-b", &"x".repeat(64)] {
            validate_id(good).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a/b",
            "..",
            "a.b",
            "a b",
            "é",
            &"x".repeat(65),
            "a\n",
        ] {
            assert!(
                matches!(validate_id(bad), Err(JailError::InvalidId(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn uid_and_gid_zero_are_refused() {
        let err = JailSpec::new("a", 0, 5).validate().unwrap_err();
        assert!(err.to_string().contains("--uid 0 is refused"), "{err}");
        let err = JailSpec::new("a", 5, 0).validate().unwrap_err();
        assert!(err.to_string().contains("--gid 0"), "{err}");
        JailSpec::new("a", 5, 5).validate().unwrap();
    }

    #[test]
    fn paths() {
        let mut spec = JailSpec::new("a", 5, 5);
        for bad in ["srv", "/srv/../etc", "/srv/./x", "/"] {
            spec.chroot_base = bad.into();
            assert!(
                matches!(spec.validate(), Err(JailError::BadPath { .. })),
                "{bad}"
            );
        }
        spec.chroot_base = "/srv/j".into();
        spec.netns = Some("netns/x".into());
        assert!(spec.validate().is_err());
        spec.netns = Some("/var/run/netns/x".into());
        spec.validate().unwrap();
        assert_eq!(spec.root_dir(), Path::new("/srv/j/a/root"));
        assert_eq!(
            host_path_of(Path::new("/srv/j/a/root"), Path::new("/tmp/../x/./y")),
            Path::new("/srv/j/a/root/tmp/x/y")
        );
        assert_eq!(
            host_path_of(Path::new("/r"), Path::new("api.sock")),
            Path::new("/r/api.sock")
        );
    }

    #[test]
    fn cgroup_settings() {
        let s = parse_cgroup_setting("memory.limit_in_bytes=268435456").unwrap();
        assert_eq!(s.controller(), "memory");
        assert_eq!(s.file, "memory.limit_in_bytes");
        assert_eq!(s.value, "268435456");
        let s = parse_cgroup_setting("cpu.max=50000 100000").unwrap();
        assert_eq!(s.value, "50000 100000");
        assert_eq!(
            parse_cgroup_setting("memory.swap.max=0")
                .unwrap()
                .controller(),
            "memory"
        );
        for bad in [
            "memory.max",
            "memory=1",
            "../memory.max=1",
            "memory/x.max=1",
            "memory.x/y=1",
            "memory...=1",
            "memory.max=",
            "memory.max=1\n2",
            ".max=1",
            "memory.=1",
            "cgroup.procs=1",
        ] {
            assert!(
                matches!(parse_cgroup_setting(bad), Err(JailError::BadCgroup { .. })),
                "{bad:?}"
            );
        }
        validate_cgroup_parent("dormouse").unwrap();
        validate_cgroup_parent("tenants/a-1").unwrap();
        for bad in ["", "/abs", "a/../b", "a//b", "a/", ".", "a b"] {
            assert!(validate_cgroup_parent(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rlimits() {
        let mut r = Rlimits::default();
        parse_rlimits("nofile=1024,fsize=1048576", &mut r).unwrap();
        assert_eq!(r.nofile, Some(1024));
        assert_eq!(r.fsize, Some(1 << 20));
        let mut r = Rlimits::default();
        parse_rlimits("fsize=0", &mut r).unwrap();
        parse_rlimits("nofile=64", &mut r).unwrap();
        assert_eq!(
            r,
            Rlimits {
                nofile: Some(64),
                fsize: Some(0)
            }
        );
        assert!(parse_rlimits("nofile=65", &mut r).is_err(), "twice");
        for bad in [
            "nofile",
            "nofile=-1",
            "nofile=1k",
            "core=0",
            "nofile=8",
            "",
            "nofile=64,",
        ] {
            assert!(
                matches!(
                    parse_rlimits(bad, &mut Rlimits::default()),
                    Err(JailError::BadRlimit { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
