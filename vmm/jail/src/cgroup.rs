//! The jail's cgroups, v1 and v2, written by hand.
//!
//! Why not the `cgroups-rs` crate: it finds its hierarchies through the running host's
//! `/proc/self/mountinfo` and its own controller models, so it cannot be pointed at a fake
//! tree in a temporary directory, and the jail needs none of its models: it writes the
//! operator's `controller.name=value` pairs verbatim (as Firecracker's jailer does), creates one
//! directory per hierarchy, enables controllers (v2) and moves one process in. That is a
//! hundred lines with injectable roots ([`CgroupFs::from_mountinfo`]), tested against fake v1
//! and v2 trees.
//!
//! - v1: one cgroup `<mount of the controller>/<parent>/<id>` per hierarchy named by the
//!   settings (co-mounted controllers, e.g. `cpu,cpuacct`, share one). A new cpuset cgroup
//!   copies `cpuset.cpus`/`cpuset.mems` from its parent (an empty one admits no task).
//! - v2: `<cgroup2 mount>/<parent>/<id>`, with the controllers the settings name enabled in the
//!   `cgroup.subtree_control` of the root and of every parent below it.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::spec::{CgroupSetting, CgroupVersion};
use crate::{JailError, Result};

/// Where the cgroup hierarchies are mounted.
#[derive(Clone, Debug)]
pub struct CgroupFs {
    version: CgroupVersion,
    /// v1: controller name → mount point of its hierarchy.
    v1: BTreeMap<String, PathBuf>,
    /// v2: the cgroup2 mount.
    v2: Option<PathBuf>,
    /// A plain directory tree standing in for cgroupfs (tests): files are created when written,
    /// and removing a cgroup removes its files first.
    plain_files: bool,
}

impl CgroupFs {
    /// The host's hierarchies, from `/proc/self/mountinfo`.
    pub fn host(version: CgroupVersion) -> Result<Self> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(JailError::io("reading", path))?;
        Ok(Self::from_mountinfo(version, &text))
    }

    /// The hierarchies listed in a mountinfo text (fstype `cgroup` with controller names among
    /// its super options, or `cgroup2`).
    pub fn from_mountinfo(version: CgroupVersion, mountinfo: &str) -> Self {
        let mut v1 = BTreeMap::new();
        let mut v2 = None;
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split(' ').nth(4) else {
                continue;
            };
            let mut right = right.split(' ');
            let (Some(fstype), Some(_source), Some(options)) =
                (right.next(), right.next(), right.next())
            else {
                continue;
            };
            let mount_point = PathBuf::from(unescape_mountinfo(mount_point));
            match fstype {
                "cgroup" => {
                    for opt in options.split(',') {
                        if !matches!(opt, "rw" | "ro") && !opt.contains('=') {
                            v1.entry(opt.to_string())
                                .or_insert_with(|| mount_point.clone());
                        }
                    }
                }
                "cgroup2" if v2.is_none() => v2 = Some(mount_point),
                _ => {}
            }
        }
        Self {
            version,
            v1,
            v2,
            plain_files: false,
        }
    }

    /// Treats the hierarchies as plain directories (tests with a fake tree).
    pub fn with_plain_files(mut self) -> Self {
        self.plain_files = true;
        self
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Creates the jail's cgroup(s) `<parent>/<id>` and writes `settings` in order.
    /// Nothing is joined yet ([`Cgroups::join`]). On failure what was created is removed.
    pub fn create(&self, parent: &str, id: &str, settings: &[CgroupSetting]) -> Result<Cgroups> {
        let mut cgroups = Cgroups {
            leaves: Vec::new(),
            created_parents: Vec::new(),
            plain_files: self.plain_files,
        };
        let result = match self.version {
            CgroupVersion::V1 => self.create_v1(parent, id, settings, &mut cgroups),
            CgroupVersion::V2 => self.create_v2(parent, id, settings, &mut cgroups),
        };
        match result {
            Ok(()) => Ok(cgroups),
            Err(e) => {
                if let Err(cleanup) = cgroups.remove(Duration::ZERO) {
                    tracing::warn!("removing the half-made cgroups: {cleanup}");
                }
                Err(e)
            }
        }
    }

    fn create_v1(
        &self,
        parent: &str,
        id: &str,
        settings: &[CgroupSetting],
        out: &mut Cgroups,
    ) -> Result<()> {
        // One cgroup per hierarchy, in the order the settings first name them.
        let mut hierarchies: Vec<(PathBuf, Vec<&CgroupSetting>)> = Vec::new();
        for setting in settings {
            let controller = setting.controller();
            let mount = self
                .v1
                .get(controller)
                .ok_or_else(|| JailError::CgroupController {
                    controller: controller.to_string(),
                    why: "has no cgroup v1 hierarchy mounted".into(),
                })?;
            match hierarchies.iter_mut().find(|(m, _)| m == mount) {
                Some((_, list)) => list.push(setting),
                None => hierarchies.push((mount.clone(), vec![setting])),
            }
        }
        for (mount, list) in hierarchies {
            let cpuset = self.v1.get("cpuset") == Some(&mount);
            let mut dir = mount.clone();
            for part in parent.split('/') {
                let child = dir.join(part);
                if self.make_dir(&child, false)? {
                    out.created_parents.push(child.clone());
                    if cpuset {
                        self.inherit_cpuset(&dir, &child)?;
                    }
                }
                dir = child;
            }
            let leaf = dir.join(id);
            self.make_dir(&leaf, true)?;
            out.leaves.push(leaf.clone());
            if cpuset {
                self.inherit_cpuset(&dir, &leaf)?;
            }
            for setting in list {
                self.write(&leaf.join(&setting.file), &setting.value)?;
            }
        }
        Ok(())
    }

    fn create_v2(
        &self,
        parent: &str,
        id: &str,
        settings: &[CgroupSetting],
        out: &mut Cgroups,
    ) -> Result<()> {
        let root = self
            .v2
            .as_ref()
            .ok_or_else(|| JailError::CgroupController {
                controller: "cgroup2".into(),
                why: "hierarchy is not mounted".into(),
            })?;
        let mut controllers: Vec<&str> = Vec::new();
        for s in settings {
            if !controllers.contains(&s.controller()) {
                controllers.push(s.controller());
            }
        }
        let available_path = root.join("cgroup.controllers");
        let available = fs::read_to_string(&available_path)
            .map_err(JailError::io("reading", &available_path))?;
        for c in &controllers {
            if !available.split_whitespace().any(|a| a == *c) {
                return Err(JailError::CgroupController {
                    controller: c.to_string(),
                    why: format!(
                        "is not available in the cgroup v2 hierarchy at {} (its cgroup.controllers: {:?}; \
                         a controller used by a v1 hierarchy is not)",
                        root.display(),
                        available.trim()
                    ),
                });
            }
        }
        let enable: String = controllers
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut dir = root.clone();
        for part in parent.split('/') {
            if !enable.is_empty() {
                self.write(&dir.join("cgroup.subtree_control"), &enable)?;
            }
            let child = dir.join(part);
            if self.make_dir(&child, false)? {
                out.created_parents.push(child.clone());
            }
            dir = child;
        }
        if !enable.is_empty() {
            self.write(&dir.join("cgroup.subtree_control"), &enable)?;
        }
        let leaf = dir.join(id);
        self.make_dir(&leaf, true)?;
        out.leaves.push(leaf.clone());
        for setting in settings {
            self.write(&leaf.join(&setting.file), &setting.value)?;
        }
        Ok(())
    }

    /// Creates `dir`; true if it was created, false if it existed (refused when `exclusive`).
    fn make_dir(&self, dir: &Path, exclusive: bool) -> Result<bool> {
        match fs::create_dir(dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if exclusive {
                    Err(JailError::CgroupExists {
                        path: dir.to_path_buf(),
                    })
                } else {
                    Ok(false)
                }
            }
            Err(e) => Err(JailError::io("creating cgroup", dir)(e)),
        }
    }

    fn inherit_cpuset(&self, parent: &Path, child: &Path) -> Result<()> {
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let mine = fs::read_to_string(child.join(file)).unwrap_or_default();
            if mine.trim().is_empty() {
                let from = parent.join(file);
                let value = fs::read_to_string(&from).map_err(JailError::io("reading", &from))?;
                self.write(&child.join(file), value.trim())?;
            }
        }
        Ok(())
    }

    fn write(&self, path: &Path, value: &str) -> Result<()> {
        write_cgroup_file(path, value, self.plain_files)
    }
}

fn write_cgroup_file(path: &Path, value: &str, plain_files: bool) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(plain_files)
        .truncate(plain_files)
        .open(path)
        .map_err(JailError::io("opening cgroup file", path))?;
    file.write_all(value.as_bytes())
        .map_err(JailError::io("writing cgroup file", path))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The jail's cgroups: one leaf per hierarchy (v1) or one (v2).
#[derive(Debug)]
pub struct Cgroups {
    leaves: Vec<PathBuf>,
    /// Parent directories this jail created (removed with it when no other jail uses them).
    created_parents: Vec<PathBuf>,
    plain_files: bool,
}

impl Cgroups {
    /// The jail's cgroup directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.leaves
    }

    /// Moves process `pid` (and the threads and children it will have) into every cgroup.
    pub fn join(&self, pid: i32) -> Result<()> {
        for leaf in &self.leaves {
            write_cgroup_file(
                &leaf.join("cgroup.procs"),
                &pid.to_string(),
                self.plain_files,
            )?;
        }
        Ok(())
    }

    /// Removes the cgroups, retrying while the kernel still counts exiting processes in them
    /// (EBUSY) for up to `patience`; then the parents this jail created, if now empty.
    pub fn remove(self, patience: Duration) -> Result<()> {
        let deadline = Instant::now() + patience;
        let mut first_error = None;
        for leaf in self.leaves.iter().rev() {
            loop {
                match self.rmdir(leaf) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        first_error.get_or_insert(JailError::io("removing cgroup", leaf)(e));
                        break;
                    }
                }
            }
        }
        for parent in self.created_parents.iter().rev() {
            // Another jail may use it (ENOTEMPTY/EBUSY): it stays, harmlessly.
            let _ = self.rmdir(parent);
        }
        first_error.map_or(Ok(()), Err)
    }

    fn rmdir(&self, dir: &Path) -> io::Result<()> {
        if self.plain_files {
            // cgroupfs removes a cgroup's files with it; a plain tree needs them gone first.
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                if entry.file_type()?.is_file() {
                    fs::remove_file(entry.path())?;
                }
            }
        }
        fs::remove_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_cgroup_setting;

    fn settings(list: &[&str]) -> Vec<CgroupSetting> {
        list.iter()
            .map(|s| parse_cgroup_setting(s).unwrap())
            .collect()
    }

    fn read(path: PathBuf) -> String {
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// A fake v1 host: cpu and cpuacct co-mounted, memory, pids and cpuset on their own.
    fn fake_v1(root: &Path) -> CgroupFs {
        let mut mountinfo = String::from("22 1 8:1 / / rw,relatime - ext4 /dev/vda rw\n");
        for (i, (dir, opts)) in [
            ("cpu,cpuacct", "rw,cpu,cpuacct"),
            ("memory", "rw,memory"),
            ("pids", "rw,pids"),
            ("cpuset", "rw,cpuset"),
            ("systemd", "rw,name=systemd"),
        ]
        .iter()
        .enumerate()
        {
            let path = root.join(dir);
            fs::create_dir_all(&path).unwrap();
            mountinfo.push_str(&format!(
                "{} 31 0:{} / {} rw,relatime - cgroup cgroup {opts}\n",
                40 + i,
                29 + i,
                path.display()
            ));
        }
        fs::write(root.join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
        fs::write(root.join("cpuset/cpuset.mems"), "0\n").unwrap();
        CgroupFs::from_mountinfo(CgroupVersion::V1, &mountinfo).with_plain_files()
    }

    #[test]
    fn mountinfo_is_parsed_with_escapes() {
        let info = "1 2 0:3 / /a\\040b rw - cgroup cgroup rw,memory\n\
                    4 5 0:6 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                    7 8 0:9 / /x rw shared:1 - cgroup cgroup rw,name=systemd\n";
        let fs = CgroupFs::from_mountinfo(CgroupVersion::V1, info);
        assert_eq!(fs.v1.get("memory").unwrap(), Path::new("/a b"));
        assert_eq!(fs.v1.len(), 1, "{:?}", fs.v1);
        assert_eq!(fs.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn v1_creates_writes_joins_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let cgfs = fake_v1(root);
        let cg = cgfs
            .create(
                "dormouse",
                "vm1",
                &settings(&[
                    "cpu.cfs_quota_us=50000",
                    "memory.limit_in_bytes=268435456",
                    "cpuacct.usage=0",
                    "pids.max=64",
                    "cpuset.cpus=1",
                ]),
            )
            .unwrap();
        let leaves: Vec<_> = cg.dirs().to_vec();
        assert_eq!(
            leaves,
            ["cpu,cpuacct", "memory", "pids", "cpuset"]
                .iter()
                .map(|d| root.join(d).join("dormouse/vm1"))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            read(root.join("cpu,cpuacct/dormouse/vm1/cpu.cfs_quota_us")),
            "50000"
        );
        assert_eq!(
            read(root.join("cpu,cpuacct/dormouse/vm1/cpuacct.usage")),
            "0"
        );
        assert_eq!(
            read(root.join("memory/dormouse/vm1/memory.limit_in_bytes")),
            "268435456"
        );
        assert_eq!(read(root.join("pids/dormouse/vm1/pids.max")), "64");
        // cpuset: the parent inherited the host's sets; the leaf then got its own cpus.
        assert_eq!(read(root.join("cpuset/dormouse/cpuset.mems")), "0");
        assert_eq!(read(root.join("cpuset/dormouse/vm1/cpuset.mems")), "0");
        assert_eq!(read(root.join("cpuset/dormouse/vm1/cpuset.cpus")), "1");
        cg.join(4242).unwrap();
        for leaf in &leaves {
            assert_eq!(read(leaf.join("cgroup.procs")), "4242");
        }
        // A second jail with the same id is refused, and leaves the first alone.
        let err = cgfs
            .create("dormouse", "vm1", &settings(&["memory.limit_in_bytes=1"]))
            .unwrap_err();
        assert!(matches!(err, JailError::CgroupExists { .. }), "{err}");
        assert!(root.join("memory/dormouse/vm1").exists());
        // Another jail under the same parent keeps the parent alive.
        let other = cgfs
            .create("dormouse", "vm2", &settings(&["pids.max=8"]))
            .unwrap();
        cg.remove(Duration::ZERO).unwrap();
        for leaf in &leaves {
            assert!(!leaf.exists(), "{}", leaf.display());
        }
        assert!(root.join("pids/dormouse/vm2").exists());
        other.remove(Duration::ZERO).unwrap();
        assert!(!root.join("pids/dormouse/vm2").exists());
        // The parent was the first jail's to remove, and was busy then: it stays (empty).
        assert!(root.join("pids/dormouse").exists());
        // The parents in hierarchies only the first jail used were removed with it.
        assert!(!root.join("memory/dormouse").exists());
    }

    #[test]
    fn v1_unknown_controller_is_refused_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let cgfs = fake_v1(dir.path());
        let err = cgfs
            .create(
                "dormouse",
                "vm1",
                &settings(&["pids.max=8", "hugetlb.2MB.limit_in_bytes=0"]),
            )
            .unwrap_err();
        assert!(err.to_string().contains("hugetlb"), "{err}");
        assert!(!dir.path().join("pids/dormouse").exists());
    }

    #[test]
    fn v2_enables_controllers_down_to_the_parent() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("unified");
        fs::create_dir(&root).unwrap();
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let info = format!("9 1 0:40 / {} rw - cgroup2 cgroup2 rw\n", root.display());
        let cgfs = CgroupFs::from_mountinfo(CgroupVersion::V2, &info).with_plain_files();
        let cg = cgfs
            .create(
                "tenants/a",
                "vm1",
                &settings(&[
                    "memory.max=268435456",
                    "cpu.max=50000 100000",
                    "pids.max=32",
                    "memory.swap.max=0",
                ]),
            )
            .unwrap();
        let leaf = root.join("tenants/a/vm1");
        assert_eq!(cg.dirs(), std::slice::from_ref(&leaf));
        for level in [root.clone(), root.join("tenants"), root.join("tenants/a")] {
            assert_eq!(
                read(level.join("cgroup.subtree_control")),
                "+memory +cpu +pids"
            );
        }
        assert_eq!(read(leaf.join("memory.max")), "268435456");
        assert_eq!(read(leaf.join("memory.swap.max")), "0");
        assert_eq!(read(leaf.join("cpu.max")), "50000 100000");
        assert_eq!(read(leaf.join("pids.max")), "32");
        cg.join(7).unwrap();
        assert_eq!(read(leaf.join("cgroup.procs")), "7");
        cg.remove(Duration::ZERO).unwrap();
        assert!(!root.join("tenants").exists());
        assert!(root.join("cgroup.controllers").exists());

        // A controller the hierarchy does not offer (here: owned by v1) is named.
        fs::write(root.join("cgroup.controllers"), "").unwrap();
        let err = cgfs
            .create("dormouse", "vm1", &settings(&["memory.max=1"]))
            .unwrap_err();
        assert!(
            err.to_string().contains("\"memory\" is not available"),
            "{err}"
        );
        assert!(!root.join("dormouse").exists());
    }
}
