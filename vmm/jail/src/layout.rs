//! The jail's directory tree on the host, what is brought into it, its lock, and its cleanup.
//!
//! ```text
//! <base>/<id>/              0700 root      the jail's directory (the VMM never sees it)
//! <base>/<id>/jail.lock     0600 root      flock'ed by the supervisor, holds its pid
//! <base>/<id>/root/         1770 root:gid  the VMM's `/` (sticky: it cannot remove what the jail made)
//!   inputs/<n>-<name>       0755 root      mount points: kernel, initrd, disks, snapshot dir, --mem-dir
//!   dev/kvm                 0600 uid:gid   (dev/net/tun, dev/vhost-vsock only when needed)
//!   proc/                   0555 root      a fresh procfs (hidepid=2, read-only)
//!   sys/module/kvm_pvm/     0555 root      only on a PVM host: the marker host detection looks for
//!   tmp/                    0700 uid:gid   scratch space for the VMM (e.g. snapshots)
//! ```
//!
//! Everything the VMM creates (sockets, snapshot directories, console files) is under `root/`.
//! When the VM has ended, [`JailDirs::cleanup`] removes what the jail created and every socket and
//! empty directory, keeps anything else (user data: snapshots, console files, logs it wrote) and
//! removes `<base>/<id>` only if nothing was kept.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::spec::JailSpec;
use crate::{sys, JailError, Result};

const LOCK_FILE: &str = "jail.lock";

/// A file or directory brought into the jail by a bind mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// The host path (canonical).
    pub host: PathBuf,
    /// Where the VMM sees it: `/inputs/<n>-<name>`.
    pub in_jail: PathBuf,
    pub read_only: bool,
    pub is_dir: bool,
}

/// The inputs of one jail, in the order they were named.
#[derive(Clone, Debug, Default)]
pub struct InputPlan {
    inputs: Vec<Input>,
}

impl InputPlan {
    pub fn new() -> Self {
        Self::default()
    }

    /// Brings the host file or directory `host` in (read-only unless `read_only` is false) and
    /// returns its path inside the jail. The same host path named twice is brought in once (and
    /// writable if either asks for it).
    pub fn add(&mut self, host: &Path, read_only: bool) -> Result<PathBuf> {
        let canonical = fs::canonicalize(host).map_err(JailError::io("input", host))?;
        let meta = fs::metadata(&canonical).map_err(JailError::io("input", host))?;
        if !(meta.is_file() || meta.is_dir()) {
            return Err(JailError::BadPath {
                path: host.to_path_buf(),
                why: "an input must be a regular file or a directory",
            });
        }
        if let Some(known) = self.inputs.iter_mut().find(|i| i.host == canonical) {
            known.read_only &= read_only;
            return Ok(known.in_jail.clone());
        }
        let name: String = canonical
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        let in_jail = PathBuf::from(format!("/inputs/{}-{}", self.inputs.len(), name));
        self.inputs.push(Input {
            host: canonical,
            in_jail: in_jail.clone(),
            read_only,
            is_dir: meta.is_dir(),
        });
        Ok(in_jail)
    }

    pub fn inputs(&self) -> &[Input] {
        &self.inputs
    }
}

/// A device node made inside the jail, with the host node's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceNode {
    pub host: &'static str,
}

impl DeviceNode {
    pub const KVM: DeviceNode = DeviceNode { host: "/dev/kvm" };
    pub const TUN: DeviceNode = DeviceNode {
        host: "/dev/net/tun",
    };
    pub const VHOST_VSOCK: DeviceNode = DeviceNode {
        host: "/dev/vhost-vsock",
    };

    /// Whether the host has the node.
    pub fn exists(&self) -> bool {
        Path::new(self.host).exists()
    }
}

/// A jail's directories on the host, locked by this supervisor.
#[derive(Debug)]
pub struct JailDirs {
    jail_dir: PathBuf,
    root: PathBuf,
    lock: Option<File>,
    /// What the jail created under `root`, relative, in creation order.
    created: Vec<PathBuf>,
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(JailError::io("creating", path))?;
    // Exactly `mode`, whatever the umask.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(JailError::io("setting the mode of", path))
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    sys::lchown(path, uid, gid).map_err(JailError::io("changing the owner of", path))
}

impl JailDirs {
    /// Creates `<base>/<id>` (refusing an existing one: a running jail, or leftovers), its
    /// lock, `root/` and everything in it (see the module documentation).
    pub fn create(spec: &JailSpec, plan: &InputPlan, devices: &[DeviceNode]) -> Result<Self> {
        fs::create_dir_all(&spec.chroot_base)
            .map_err(JailError::io("creating the chroot base", &spec.chroot_base))?;
        let base = fs::canonicalize(&spec.chroot_base).map_err(JailError::io(
            "resolving the chroot base",
            &spec.chroot_base,
        ))?;
        let jail_dir = base.join(&spec.id);
        match fs::DirBuilder::new().mode(0o700).create(&jail_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(existing_jail(&spec.id, &jail_dir))
            }
            Err(e) => return Err(JailError::io("creating", &jail_dir)(e)),
        }
        let mut dirs = JailDirs {
            root: jail_dir.join("root"),
            jail_dir,
            lock: None,
            created: Vec::new(),
        };
        if let Err(e) = dirs.populate(spec, plan, devices) {
            dirs.cleanup();
            return Err(e);
        }
        Ok(dirs)
    }

    fn populate(
        &mut self,
        spec: &JailSpec,
        plan: &InputPlan,
        devices: &[DeviceNode],
    ) -> Result<()> {
        fs::set_permissions(&self.jail_dir, fs::Permissions::from_mode(0o700))
            .map_err(JailError::io("setting the mode of", &self.jail_dir))?;
        let lock_path = self.jail_dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(JailError::io("creating", &lock_path))?;
        sys::try_lock(lock.as_raw_fd()).map_err(JailError::io("locking", &lock_path))?;
        let _ = write!(lock, "{}", std::process::id());
        self.lock = Some(lock);

        mkdir(&self.root, 0o1770)?;
        chown(&self.root, 0, spec.gid)?;
        let (uid, gid) = (spec.uid, spec.gid);
        if !plan.inputs().is_empty() {
            self.dir("inputs", 0o755, None)?;
            for input in plan.inputs() {
                let rel = input.in_jail.strip_prefix("/").unwrap_or(&input.in_jail);
                let path = self.root.join(rel);
                if input.is_dir {
                    mkdir(&path, 0o700)?;
                } else {
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .map_err(JailError::io("creating the mount point", &path))?;
                }
                self.created.push(rel.to_path_buf());
            }
        }
        self.dir("dev", 0o755, None)?;
        for dev in devices {
            let host = Path::new(dev.host);
            let meta = fs::metadata(host).map_err(JailError::io("device", host))?;
            if !meta.file_type().is_char_device() {
                return Err(JailError::BadPath {
                    path: host.to_path_buf(),
                    why: "not a character device",
                });
            }
            let rel = host.strip_prefix("/").unwrap_or(host).to_path_buf();
            if let Some(parent) = rel.parent() {
                if !self.root.join(parent).exists() {
                    self.dir(&parent.to_string_lossy(), 0o755, None)?;
                }
            }
            let path = self.root.join(&rel);
            sys::mknod_char(&path, 0o600, meta.rdev())
                .map_err(JailError::io("creating the device node", &path))?;
            self.created.push(rel);
            chown(&path, uid, gid)?;
        }
        self.dir("proc", 0o555, None)?;
        if Path::new("/sys/module/kvm_pvm").exists() {
            self.dir("sys", 0o555, None)?;
            self.dir("sys/module", 0o555, None)?;
            self.dir("sys/module/kvm_pvm", 0o555, None)?;
        }
        self.dir("tmp", 0o700, Some((uid, gid)))?;
        for name in &spec.vmm_dirs {
            self.dir(name, 0o700, Some((uid, gid)))?;
        }
        Ok(())
    }

    fn dir(&mut self, rel: &str, mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
        let path = self.root.join(rel);
        mkdir(&path, mode)?;
        self.created.push(PathBuf::from(rel));
        if let Some((uid, gid)) = owner {
            chown(&path, uid, gid)?;
        }
        Ok(())
    }

    /// `<base>/<id>/root`, the VMM's `/` on the host.
    /// Writes this process's pid into the lock file again: `--daemonize` forks after the jail
    /// was prepared, and "a jail with id … is running (pid …)" must name the live supervisor.
    pub fn record_supervisor_pid(&mut self) {
        if let Some(lock) = &mut self.lock {
            let pid = std::process::id().to_string();
            let written = lock
                .set_len(0)
                .and_then(|()| std::os::unix::fs::FileExt::write_all_at(&*lock, pid.as_bytes(), 0));
            if let Err(e) = written {
                tracing::warn!("recording the supervisor's pid in the lock file: {e}");
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes a small file of the jail's (root-owned, world-readable) right in the root; it is
    /// removed with the jail.
    pub fn write_file(&mut self, name: &str, contents: &str) -> Result<()> {
        let path = self.root.join(name);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(JailError::io("creating", &path))?;
        self.created.push(PathBuf::from(name));
        file.write_all(contents.as_bytes())
            .map_err(JailError::io("writing", &path))
    }

    /// Removes what the jail created, every socket and empty directory the VMM left; keeps the
    /// rest (logging `kept <host path>` for each) and removes `<base>/<id>` only if nothing was
    /// kept. Returns the kept paths. Call it when no process of the jail is left.
    pub fn cleanup(&mut self) -> Vec<PathBuf> {
        let created: HashSet<PathBuf> = self.created.iter().cloned().collect();
        let mut kept = Vec::new();
        if self.root.exists() {
            sweep(&self.root, Path::new(""), &created, &mut kept);
            match fs::remove_dir(&self.root) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if kept.is_empty() => {
                    tracing::warn!("removing {}: {e}", self.root.display());
                    kept.push(self.root.clone());
                }
                Err(_) => {}
            }
        }
        for path in &kept {
            tracing::info!("kept {}", path.display());
        }
        let _ = fs::remove_file(self.jail_dir.join(LOCK_FILE));
        self.lock = None;
        if kept.is_empty() {
            if let Err(e) = fs::remove_dir(&self.jail_dir) {
                tracing::warn!("removing {}: {e}", self.jail_dir.display());
            }
        }
        kept
    }
}

/// Removes sockets, what the jail created and directories left empty under `dir` (never
/// following a symlink); pushes the topmost kept entries on `kept`. True if `dir` is now empty.
fn sweep(dir: &Path, rel: &Path, created: &HashSet<PathBuf>, kept: &mut Vec<PathBuf>) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        kept.push(dir.to_path_buf());
        return false;
    };
    let mut empty = true;
    for entry in entries.flatten() {
        let path = entry.path();
        let rel_child = rel.join(entry.file_name());
        let Ok(ft) = entry.file_type() else {
            empty = false;
            kept.push(path);
            continue;
        };
        let ours = created.contains(&rel_child);
        if ft.is_dir() {
            let mark = kept.len();
            let now_empty = sweep(&path, &rel_child, created, kept);
            if now_empty && fs::remove_dir(&path).is_ok() {
                continue;
            }
            empty = false;
            if !ours {
                // A directory the VMM made (a snapshot): name it, not each of its files.
                kept.truncate(mark);
                kept.push(path);
            }
        } else if ours || ft.is_socket() {
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!("removing {}: {e}", path.display());
                empty = false;
            }
        } else {
            empty = false;
            kept.push(path);
        }
    }
    empty
}

fn existing_jail(id: &str, jail_dir: &Path) -> JailError {
    let lock_path = jail_dir.join(LOCK_FILE);
    if let Ok(mut lock) = File::open(&lock_path) {
        if let Ok(false) = sys::try_lock(lock.as_raw_fd()) {
            let mut pid = String::new();
            let _ = lock.read_to_string(&mut pid);
            return JailError::Running {
                id: id.to_string(),
                dir: jail_dir.to_path_buf(),
                pid,
            };
        }
    }
    JailError::Stale {
        dir: jail_dir.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn inputs_get_numbered_names_and_are_brought_in_once() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        fs::write(&kernel, "k").unwrap();
        let odd = dir.path().join("my disk (1).img");
        fs::write(&odd, "d").unwrap();
        let snap = dir.path().join("snap");
        fs::create_dir(&snap).unwrap();
        let mut plan = InputPlan::new();
        assert_eq!(
            plan.add(&kernel, true).unwrap(),
            Path::new("/inputs/0-vmlinux")
        );
        assert_eq!(
            plan.add(&odd, false).unwrap(),
            Path::new("/inputs/1-my_disk__1_.img")
        );
        assert_eq!(plan.add(&snap, true).unwrap(), Path::new("/inputs/2-snap"));
        // The same file through another spelling: once, and writable if either wants it.
        let again = dir.path().join(".").join("vmlinux");
        assert_eq!(
            plan.add(&again, false).unwrap(),
            Path::new("/inputs/0-vmlinux")
        );
        let inputs = plan.inputs();
        assert_eq!(inputs.len(), 3);
        assert!(!inputs[0].read_only && !inputs[0].is_dir);
        assert!(inputs[2].read_only && inputs[2].is_dir);
        assert!(plan.add(&dir.path().join("missing"), true).is_err());
    }

    fn spec_in(base: &Path) -> JailSpec {
        // The test runs as whoever runs it: own the jail's files as that user.
        let (u, g) = sys::ids();
        let mut spec = JailSpec::new("t-1", u[0].max(1), g[0].max(1));
        spec.chroot_base = base.to_path_buf();
        spec
    }

    fn can_chown() -> bool {
        sys::ids().0[1] == 0
    }

    #[test]
    fn vmm_dirs_and_the_pid_file_are_made_and_removed_with_the_jail() {
        if !can_chown() {
            eprintln!("SKIPPED: needs root (chown)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec_in(&dir.path().join("base"));
        spec.vmm_dirs = vec!["run".into()];
        spec.pid_file = Some("firecracker.pid".into());
        let mut dirs = JailDirs::create(&spec, &InputPlan::new(), &[]).unwrap();
        let root = dirs.root().to_path_buf();
        let run = fs::metadata(root.join("run")).unwrap();
        assert!(run.is_dir());
        assert_eq!((run.uid(), run.gid()), (spec.uid, spec.gid));
        dirs.write_file("firecracker.pid", "4242").unwrap();
        assert_eq!(
            fs::read_to_string(root.join("firecracker.pid")).unwrap(),
            "4242"
        );
        // Never through a link the VMM could have planted.
        std::os::unix::fs::symlink("/etc/passwd", root.join("planted.pid")).unwrap();
        assert!(dirs.write_file("planted.pid", "1").is_err());
        fs::remove_file(root.join("planted.pid")).unwrap();
        let _api = UnixListener::bind(root.join("run/api.sock")).unwrap();
        assert!(dirs.cleanup().is_empty());
        assert!(!dir.path().join("base/t-1").exists());
        // Names, not paths.
        for bad in ["", "..", "a/b"] {
            let mut spec = spec_in(&dir.path().join("base"));
            spec.pid_file = Some(bad.into());
            assert!(spec.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cleanup_removes_what_the_jail_made_and_keeps_user_data() {
        if !can_chown() {
            eprintln!("SKIPPED: needs root (chown)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        fs::write(&kernel, "k").unwrap();
        let snap = dir.path().join("snap");
        fs::create_dir(&snap).unwrap();
        let mut plan = InputPlan::new();
        plan.add(&kernel, true).unwrap();
        plan.add(&snap, true).unwrap();
        let base = dir.path().join("base");
        let spec = spec_in(&base);
        let mut dirs = JailDirs::create(&spec, &plan, &[DeviceNode::KVM]).unwrap();
        let root = dirs.root().to_path_buf();
        assert_eq!(root, base.join("t-1/root"));
        for p in [
            "inputs/0-vmlinux",
            "inputs/1-snap",
            "dev/kvm",
            "proc",
            "tmp",
        ] {
            assert!(root.join(p).symlink_metadata().is_ok(), "{p}");
        }
        let kvm = fs::metadata(root.join("dev/kvm")).unwrap();
        assert_eq!(kvm.mode() & 0o7777, 0o600);
        assert_eq!(kvm.uid(), spec.uid);
        assert_eq!(fs::metadata(&root).unwrap().mode() & 0o7777, 0o1770);
        // A second jail with this id is refused while the first runs.
        let err = JailDirs::create(&spec, &plan, &[]).unwrap_err();
        assert!(matches!(err, JailError::Running { .. }), "{err}");

        // What a VMM leaves: sockets, a snapshot, a console file, empty directories.
        let _api = UnixListener::bind(root.join("api.sock")).unwrap();
        let _v = UnixListener::bind(root.join("v.sock_1024")).unwrap();
        fs::create_dir_all(root.join("tmp/snap-a")).unwrap();
        fs::write(root.join("tmp/snap-a/state.bin"), "s").unwrap();
        fs::write(root.join("console.log"), "c").unwrap();
        fs::create_dir_all(root.join("empty/deeper")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
        let mut kept = dirs.cleanup();
        kept.sort();
        assert_eq!(
            kept,
            vec![
                root.join("console.log"),
                root.join("etc-link"),
                root.join("tmp/snap-a")
            ]
        );
        assert!(root.join("tmp/snap-a/state.bin").exists());
        for gone in ["api.sock", "v.sock_1024", "dev", "inputs", "proc", "empty"] {
            assert!(root.join(gone).symlink_metadata().is_err(), "{gone}");
        }
        assert!(!base.join("t-1").join(LOCK_FILE).exists());
        assert!(Path::new("/etc").exists(), "the symlink was not followed");
        // The kept files make the next jail with this id refuse, naming the directory.
        let err = JailDirs::create(&spec, &plan, &[]).unwrap_err();
        assert!(matches!(err, JailError::Stale { .. }), "{err}");
        assert!(err.to_string().contains("t-1"), "{err}");
        assert!(
            root.join("tmp/snap-a/state.bin").exists(),
            "unknown content is not deleted"
        );

        // With nothing kept, the whole jail directory goes.
        fs::remove_dir_all(base.join("t-1")).unwrap();
        let mut dirs = JailDirs::create(&spec, &plan, &[]).unwrap();
        assert!(dirs.cleanup().is_empty());
        assert!(!base.join("t-1").exists());
        assert!(base.exists());
    }
}
