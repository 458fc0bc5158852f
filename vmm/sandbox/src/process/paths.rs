//! Where a sandbox process's sockets and snapshot staging directories are: as the process sees
//! them (arguments and API requests) and as the host sees them (where the manager connects and
//! finds files). Unjailed both are under the sandbox's work directory; jailed, the process sees
//! `/api.sock` and the host `<chroot base>/<jail id>/root/api.sock`.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcessPaths {
    /// The sandbox's work directory (host), for the stderr file.
    work_dir: PathBuf,
    /// The host path of the jail's root, when jailed.
    jail_root: Option<PathBuf>,
}

impl ProcessPaths {
    pub fn unjailed(work_dir: &Path) -> Self {
        Self {
            work_dir: work_dir.to_path_buf(),
            jail_root: None,
        }
    }

    pub fn jailed(work_dir: &Path, chroot_base: &Path, jail_id: &str) -> Self {
        Self {
            work_dir: work_dir.to_path_buf(),
            jail_root: Some(chroot_base.join(jail_id).join("root")),
        }
    }

    /// `name` (relative) as the process sees it.
    fn inside(&self, name: &str) -> PathBuf {
        match &self.jail_root {
            Some(_) => Path::new("/").join(name),
            None => self.work_dir.join(name),
        }
    }

    /// `name` as the host sees it.
    fn host(&self, name: &str) -> PathBuf {
        match &self.jail_root {
            Some(root) => root.join(name),
            None => self.work_dir.join(name),
        }
    }

    pub fn api_arg(&self) -> PathBuf {
        self.inside("api.sock")
    }

    pub fn api_host(&self) -> PathBuf {
        self.host("api.sock")
    }

    pub fn vsock_arg(&self) -> PathBuf {
        self.inside("vsock.sock")
    }

    pub fn vsock_host(&self) -> PathBuf {
        self.host("vsock.sock")
    }

    /// `--mem-dir` for `BootSpec::ram_in_work_dir`: the work directory, a host path (the jail
    /// bind-mounts it in, like every input). Unjailed, a snapshot staged beside it links guest
    /// RAM; jailed, the staging directory is on another mount, so memory is copied.
    pub fn mem_dir_arg(&self) -> PathBuf {
        self.work_dir.clone()
    }

    /// The parent of the staging directories, on the host.
    pub fn staging_parent_host(&self) -> PathBuf {
        self.host("snapshots")
    }

    /// Snapshot staging directory `n`: (as the process sees it, as the host sees it).
    pub fn staging(&self, n: u64) -> (PathBuf, PathBuf) {
        let name = format!("snapshots/{n}");
        (self.inside(&name), self.host(&name))
    }

    /// The process's stderr (host; the manager writes it, so never inside the jail).
    pub fn stderr(&self) -> PathBuf {
        self.work_dir.join("dormouse.stderr")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unjailed_paths_are_host_paths() {
        let p = ProcessPaths::unjailed(Path::new("/w/sb-1"));
        assert_eq!(p.api_arg(), p.api_host());
        assert_eq!(p.api_host(), Path::new("/w/sb-1/api.sock"));
        assert_eq!(p.vsock_arg(), Path::new("/w/sb-1/vsock.sock"));
        let (inside, host) = p.staging(3);
        assert_eq!(inside, host);
        assert_eq!(host, Path::new("/w/sb-1/snapshots/3"));
        assert_eq!(p.stderr(), Path::new("/w/sb-1/dormouse.stderr"));
    }

    #[test]
    fn jailed_paths_split_inside_and_host() {
        let p = ProcessPaths::jailed(Path::new("/w/sb-1"), Path::new("/srv/dormouse"), "j-sb-1");
        assert_eq!(p.api_arg(), Path::new("/api.sock"));
        assert_eq!(
            p.api_host(),
            Path::new("/srv/dormouse/j-sb-1/root/api.sock")
        );
        assert_eq!(p.vsock_arg(), Path::new("/vsock.sock"));
        let (inside, host) = p.staging(0);
        assert_eq!(inside, Path::new("/snapshots/0"));
        assert_eq!(host, Path::new("/srv/dormouse/j-sb-1/root/snapshots/0"));
        assert_eq!(p.mem_dir_arg(), Path::new("/w/sb-1"));
        assert_eq!(p.stderr(), Path::new("/w/sb-1/dormouse.stderr"));
    }
}
