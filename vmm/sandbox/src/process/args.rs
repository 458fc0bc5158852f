//! The command line of a sandbox process, as a pure function of what it should run: `dormouse
//! [jail … --] run|restore …`. Input files are host paths (the jail bind-mounts them in);
//! sockets and snapshot directories are the paths the process sees (`paths`).

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use crate::isolation::CgroupVersion;
use vmm::SeccompLevel;

/// A NIC as the process gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SandboxNic {
    pub tap: String,
    pub mac: [u8; 6],
}

/// `dormouse jail` options for one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JailArgs {
    pub id: String,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
    pub cgroup_version: CgroupVersion,
    /// `FILE=VALUE` pairs, in order.
    pub cgroups: Vec<(String, String)>,
    pub nofile: u64,
    pub new_pid_ns: bool,
}

/// A disk as the process gets it: host path, read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LaunchDisk {
    pub path: PathBuf,
    pub read_only: bool,
}

/// `dormouse run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunLaunch {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// `--mem-dir`, as the process sees it.
    pub mem_dir: Option<PathBuf>,
    /// In order; the first is the root filesystem when `root_on_first_disk`.
    pub disks: Vec<LaunchDisk>,
    pub root_on_first_disk: bool,
    pub nets: Vec<SandboxNic>,
    pub cid: u64,
    pub balloon: Option<devices::virtio::balloon::BalloonConfig>,
}

/// `dormouse restore`: a template or fork (every override given) or a wake (none but the
/// sockets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RestoreLaunch {
    pub dir: PathBuf,
    pub disks: Vec<LaunchDisk>,
    pub nets: Vec<SandboxNic>,
    pub cid: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Launch {
    Run(RunLaunch),
    Restore(RestoreLaunch),
}

/// The process's end of its sockets and console, as it sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoints {
    pub api_sock: PathBuf,
    pub vsock_uds: PathBuf,
    /// Console on stdout (the manager appends it to the console log) or discarded.
    pub console_to_stdout: bool,
    pub seccomp: SeccompLevel,
    /// The sandbox's id: the VM's `vm_id` metrics label (`--id`).
    pub vm_id: String,
}

fn seccomp_word(level: SeccompLevel) -> &'static str {
    match level {
        SeccompLevel::Enforce => "enforce",
        SeccompLevel::Log => "log",
        SeccompLevel::Off => "off",
    }
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `key=PATH[suffix]`, refusing paths the option parsers would split (`,`).
fn kv_path(key: &str, path: &std::path::Path, suffix: &str) -> Result<OsString, String> {
    if path.as_os_str().as_encoded_bytes().contains(&b',') {
        return Err(format!(
            "{} contains a comma, which dormouse's {key}= options cannot carry",
            path.display()
        ));
    }
    let mut word = OsString::from(format!("{key}="));
    word.push(path.as_os_str());
    word.push(suffix);
    Ok(word)
}

fn disk_word(disk: &LaunchDisk) -> Result<OsString, String> {
    kv_path("path", &disk.path, if disk.read_only { ",ro" } else { "" })
}

fn net_word(nic: &SandboxNic) -> OsString {
    OsString::from(format!("tap={},mac={}", nic.tap, mac_text(&nic.mac)))
}

fn jail_prefix(jail: &JailArgs, out: &mut Vec<OsString>) {
    let mut push = |s: &dyn AsRef<OsStr>| out.push(s.as_ref().to_os_string());
    push(&"jail");
    push(&"--id");
    push(&jail.id);
    push(&"--uid");
    push(&jail.uid.to_string());
    push(&"--gid");
    push(&jail.gid.to_string());
    push(&"--chroot-base");
    push(&jail.chroot_base);
    push(&"--cgroup-version");
    push(&match jail.cgroup_version {
        CgroupVersion::V1 => "1",
        CgroupVersion::V2 => "2",
    });
    for (file, value) in &jail.cgroups {
        push(&"--cgroup");
        push(&format!("{file}={value}"));
    }
    push(&"--rlimit");
    push(&format!("nofile={}", jail.nofile));
    if jail.new_pid_ns {
        push(&"--new-pid-ns");
    }
    push(&"--");
}

/// Everything after the binary's name.
pub(crate) fn command_args(
    jail: Option<&JailArgs>,
    launch: &Launch,
    ends: &Endpoints,
) -> Result<Vec<OsString>, String> {
    let mut out: Vec<OsString> = Vec::new();
    if let Some(jail) = jail {
        jail_prefix(jail, &mut out);
    }
    let mut push = |s: &dyn AsRef<OsStr>| out.push(s.as_ref().to_os_string());
    match launch {
        Launch::Run(run) => {
            push(&"run");
            push(&"--kernel");
            push(&run.kernel);
            if let Some(initrd) = &run.initrd {
                push(&"--initrd");
                push(initrd);
            }
            let mut cmdline = run.cmdline.clone();
            for (index, disk) in run.disks.iter().enumerate() {
                if index == 0 && run.root_on_first_disk && !disk.read_only {
                    push(&"--rootfs");
                    push(&disk.path);
                    continue;
                }
                if index == 0 && run.root_on_first_disk {
                    // `--rootfs` is writable; a read-only root is a plain disk plus `root=`.
                    cmdline.push_str(" root=/dev/vda ro");
                }
                push(&"--disk");
                push(&disk_word(disk)?);
            }
            push(&"--cmdline");
            push(&cmdline);
            push(&"--vcpus");
            push(&run.vcpus.to_string());
            push(&"--mem-mib");
            push(&run.mem_mib.to_string());
            if let Some(dir) = &run.mem_dir {
                push(&"--mem-dir");
                push(dir);
            }
            for nic in &run.nets {
                push(&"--net");
                push(&net_word(nic));
            }
            push(&"--vsock");
            let mut vsock = OsString::from(format!("cid={},", run.cid));
            vsock.push(kv_path("uds", &ends.vsock_uds, ",backend=userspace")?);
            push(&vsock);
            if let Some(b) = &run.balloon {
                push(&"--balloon");
                push(&format!(
                    "target_mib={},deflate_on_oom={},stats_s={},free_page_reporting={}",
                    b.target_mib, b.deflate_on_oom, b.stats_interval_s, b.free_page_reporting
                ));
            }
        }
        Launch::Restore(restore) => {
            push(&"restore");
            push(&"--dir");
            push(&restore.dir);
            for disk in &restore.disks {
                push(&"--disk");
                push(&disk_word(disk)?);
            }
            for nic in &restore.nets {
                push(&"--net");
                push(&net_word(nic));
            }
            if let Some(cid) = restore.cid {
                push(&"--vsock-cid");
                push(&cid.to_string());
            }
            push(&"--vsock-uds");
            push(&ends.vsock_uds);
        }
    }
    push(&"--api-sock");
    push(&ends.api_sock);
    push(&"--console");
    push(&if ends.console_to_stdout {
        "stdio"
    } else {
        "null"
    });
    push(&"--seccomp");
    push(&seccomp_word(ends.seccomp));
    push(&"--id");
    push(&ends.vm_id);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn ends(api: &str, vsock: &str) -> Endpoints {
        Endpoints {
            api_sock: api.into(),
            vsock_uds: vsock.into(),
            console_to_stdout: true,
            seccomp: SeccompLevel::Enforce,
            vm_id: "sb-1".into(),
        }
    }

    fn nic() -> SandboxNic {
        SandboxNic {
            tap: "dm1t0".into(),
            mac: [0x02, 0, 0, 0, 0, 0xab],
        }
    }

    fn run() -> Launch {
        Launch::Run(RunLaunch {
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/init.cpio".into()),
            cmdline: "console=ttyS0 dormouse.hostname=sb-1".into(),
            vcpus: 2,
            mem_mib: 128,
            mem_dir: None,
            disks: vec![
                LaunchDisk {
                    path: "/w/sb-1/disk-0.img".into(),
                    read_only: false,
                },
                LaunchDisk {
                    path: "/base.img".into(),
                    read_only: true,
                },
            ],
            root_on_first_disk: true,
            nets: vec![nic()],
            cid: 7,
            balloon: None,
        })
    }

    fn jail() -> JailArgs {
        JailArgs {
            id: "dm1m0-sb-1".into(),
            uid: 200_000,
            gid: 200_000,
            chroot_base: "/srv/dormouse".into(),
            cgroup_version: CgroupVersion::V2,
            cgroups: vec![
                ("memory.max".into(), "268435456".into()),
                ("pids.max".into(), "256".into()),
            ],
            nofile: 4096,
            new_pid_ns: true,
        }
    }

    #[test]
    fn run_without_a_jail() {
        let args = command_args(None, &run(), &ends("/w/sb-1/api.sock", "/w/sb-1/v.sock"));
        assert_eq!(
            words(&args.unwrap()),
            [
                "run",
                "--kernel",
                "/k/vmlinux",
                "--initrd",
                "/k/init.cpio",
                "--rootfs",
                "/w/sb-1/disk-0.img",
                "--disk",
                "path=/base.img,ro",
                "--cmdline",
                "console=ttyS0 dormouse.hostname=sb-1",
                "--vcpus",
                "2",
                "--mem-mib",
                "128",
                "--net",
                "tap=dm1t0,mac=02:00:00:00:00:ab",
                "--vsock",
                "cid=7,uds=/w/sb-1/v.sock,backend=userspace",
                "--api-sock",
                "/w/sb-1/api.sock",
                "--console",
                "stdio",
                "--seccomp",
                "enforce",
                "--id",
                "sb-1",
            ]
        );
    }

    #[test]
    fn a_balloon_becomes_the_balloon_option_that_parses_back() {
        let Launch::Run(mut launch) = run() else {
            unreachable!()
        };
        let balloon = devices::virtio::balloon::BalloonConfig {
            target_mib: 16,
            deflate_on_oom: true,
            stats_interval_s: 2,
            free_page_reporting: true,
        };
        launch.balloon = Some(balloon);
        let args = command_args(None, &Launch::Run(launch), &ends("/a.sock", "/v.sock")).unwrap();
        let words = words(&args);
        let at = words.iter().position(|w| w == "--balloon").unwrap();
        assert_eq!(vmm::options::parse_balloon(&words[at + 1]), Ok(balloon));
    }

    #[test]
    fn run_in_a_jail_uses_in_jail_sockets_and_host_inputs() {
        let args = command_args(Some(&jail()), &run(), &ends("/api.sock", "/vsock.sock")).unwrap();
        let w = words(&args);
        let split = w.iter().position(|a| a == "--").unwrap();
        assert_eq!(
            w[..split],
            [
                "jail",
                "--id",
                "dm1m0-sb-1",
                "--uid",
                "200000",
                "--gid",
                "200000",
                "--chroot-base",
                "/srv/dormouse",
                "--cgroup-version",
                "2",
                "--cgroup",
                "memory.max=268435456",
                "--cgroup",
                "pids.max=256",
                "--rlimit",
                "nofile=4096",
                "--new-pid-ns",
            ]
        );
        assert_eq!(w[split + 1], "run");
        // Input files stay host paths; the jail bind-mounts them.
        assert!(w.contains(&"/k/vmlinux".to_string()));
        assert!(w.contains(&"cid=7,uds=/vsock.sock,backend=userspace".to_string()));
        let api = w
            .iter()
            .position(|a| a == "--api-sock")
            .expect("--api-sock");
        assert_eq!(w[api + 1], "/api.sock");
    }

    #[test]
    fn a_read_only_root_is_a_disk_plus_root_word() {
        let Launch::Run(mut r) = run() else {
            unreachable!()
        };
        r.disks[0].read_only = true;
        let w = words(&command_args(None, &Launch::Run(r), &ends("/a", "/v")).unwrap());
        assert!(!w.contains(&"--rootfs".to_string()));
        assert!(w.contains(&"path=/w/sb-1/disk-0.img,ro".to_string()));
        assert!(w.contains(&"console=ttyS0 dormouse.hostname=sb-1 root=/dev/vda ro".to_string()));
    }

    #[test]
    fn fork_and_wake() {
        let fork = Launch::Restore(RestoreLaunch {
            dir: "/cp".into(),
            disks: vec![LaunchDisk {
                path: "/w/sb-2/disk-0.img".into(),
                read_only: false,
            }],
            nets: vec![nic()],
            cid: Some(9),
        });
        let mut e = ends("/api.sock", "/vsock.sock");
        e.console_to_stdout = false;
        e.seccomp = SeccompLevel::Log;
        assert_eq!(
            words(&command_args(None, &fork, &e).unwrap()),
            [
                "restore",
                "--dir",
                "/cp",
                "--disk",
                "path=/w/sb-2/disk-0.img",
                "--net",
                "tap=dm1t0,mac=02:00:00:00:00:ab",
                "--vsock-cid",
                "9",
                "--vsock-uds",
                "/vsock.sock",
                "--api-sock",
                "/api.sock",
                "--console",
                "null",
                "--seccomp",
                "log",
                "--id",
                "sb-1",
            ]
        );
        let wake = Launch::Restore(RestoreLaunch {
            dir: "/hib".into(),
            disks: Vec::new(),
            nets: Vec::new(),
            cid: None,
        });
        let w = words(&command_args(Some(&jail()), &wake, &e).unwrap());
        let split = w.iter().position(|a| a == "--").unwrap();
        assert_eq!(
            w[split + 1..split + 6],
            ["restore", "--dir", "/hib", "--vsock-uds", "/vsock.sock"]
        );
    }

    #[test]
    fn commas_in_paths_are_refused() {
        let wake = Launch::Restore(RestoreLaunch {
            dir: "/hib".into(),
            disks: vec![LaunchDisk {
                path: "/a,b/disk.img".into(),
                read_only: false,
            }],
            nets: Vec::new(),
            cid: None,
        });
        let err = command_args(None, &wake, &ends("/a", "/v")).unwrap_err();
        assert!(err.contains("comma"), "{err}");
    }
}
