//! Firecracker's `jailer` command line on dormouse's jail (docs/firecracker.md, "The jailer"):
//! the binary started through a link named `jailer`, `--exec-file` a link named `firecracker`,
//! lays the jail out as Firecracker does (`<base>/firecracker/<id>/root`, `run/`,
//! `firecracker.pid`), runs the VMM under the uid/gid, cgroup and rlimit given, serves the
//! Firecracker API at `<root>/run/api.sock`; a client places the tiny guest's kernel in the
//! root and boots it through InstanceStart; SIGTERM ends it and the jail is cleaned up. As root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::*;
use vmm::tiny_guest::{self, TinyGuestEnd};

const UID: u32 = 10124;

fn ready() -> bool {
    require_kvm() && require_root()
}

fn link(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::os::unix::fs::symlink(dormouse_bin(), &path).unwrap();
    path
}

fn wait_until(what: &str, child: &mut Child, log: &Path, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the jailer ended early:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "no {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ok(sock: &Path, method: &str, path: &str, body: &str) {
    let (status, answer) = api_request(sock, method, path, body);
    assert!(
        status.starts_with("HTTP/1.1 204"),
        "{method} {path}: {status} {answer}"
    );
}

struct Terminated(Option<Child>);

impl Drop for Terminated {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

#[test]
fn jailer_as_firecrackers_runs_the_tiny_guest_and_cleans_up() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let jailer = link(dir.path(), "jailer");
    let firecracker = link(dir.path(), "firecracker");
    let base = dir.path().join("jails");
    std::fs::create_dir(&base).unwrap();
    let id = format!("jailer-{}", std::process::id());
    let log = dir.path().join("jailer.log");
    let uid = UID.to_string();
    let child = Command::new(&jailer)
        .args(["--id", &id, "--exec-file"])
        .arg(&firecracker)
        .args(["--uid", &uid, "--gid", &uid, "--chroot-base-dir"])
        .arg(&base)
        .args([
            "--cgroup-version",
            "1",
            "--cgroup",
            "pids.max=64",
            "--resource-limit",
            "no-file=512",
            "--resource-limit",
            "fsize=1073741824",
            "--",
            "--api-sock",
            "/run/api.sock",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut guard = Terminated(Some(child));
    // Firecracker's layout: <chroot-base-dir>/<exec-file name>/<id>/root.
    let jail_dir = base.join("firecracker").join(&id);
    let root = jail_dir.join("root");
    let sock = root.join("run/api.sock");
    wait_until("API socket", guard.0.as_mut().unwrap(), &log, || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });

    // The pid file names the VMM, which runs as the uid/gid given with the limits given.
    let pid_file = root.join("firecracker.pid");
    let vmm: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(
        vmm,
        guard.0.as_ref().unwrap().id(),
        "the VMM is the supervisor's child"
    );
    assert_eq!(status_field(vmm, "Uid"), [uid.as_str(); 4].join(" "));
    assert_eq!(status_field(vmm, "Gid"), [uid.as_str(); 4].join(" "));
    assert_eq!(status_field(vmm, "NoNewPrivs"), "1");
    let limits = std::fs::read_to_string(format!("/proc/{vmm}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name}:\n{limits}"))
            .split_whitespace()
            .rev()
            .nth(2)
            .unwrap()
            .to_string()
    };
    assert_eq!(limit("Max open files"), "512");
    assert_eq!(limit("Max file size"), "1073741824");
    let cgroups = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    let want = format!(":pids:/firecracker/{id}");
    assert!(
        cgroups.lines().any(|l| l.ends_with(&want)),
        "{want} not in:\n{cgroups}"
    );
    let cgroup_dir = PathBuf::from(format!("/sys/fs/cgroup/pids/firecracker/{id}"));
    assert_eq!(
        std::fs::read_to_string(cgroup_dir.join("pids.max"))
            .unwrap()
            .trim(),
        "64"
    );
    // The ID the jailer passed on.
    let (status, info) = api_request(&sock, "GET", "/", "");
    assert!(status.starts_with("HTTP/1.1 200"), "{status} {info}");
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["id"], id.as_str());
    assert_eq!(info["state"], "Not started");

    // A client places the kernel in the root, as for Firecracker, and names its jail path.
    let kernel = root.join("tiny.elf");
    tiny_guest::write_portable_to(&kernel, TinyGuestEnd::Idle).unwrap();
    ok(
        &sock,
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/tiny.elf", "boot_args": "console=ttyS0"}"#,
    );
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32}"#,
    );
    // A host path does not exist in the jail.
    let host_kernel = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    let (status, _) = api_request(&sock, "PUT", "/boot-source", &host_kernel);
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    let (status, info) = api_request(&sock, "GET", "/", "");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(info.contains(r#""state":"Running""#), "{info}");
    std::thread::sleep(Duration::from_millis(300));
    let (_, info) = api_request(&sock, "GET", "/", "");
    assert!(
        info.contains(r#""state":"Running""#),
        "still running: {info}"
    );

    // SIGTERM to the jailer: the VMM ends, the jail is cleaned up; the file the client put in
    // stays, as Firecracker's jailer leaves the whole directory to its client.
    let child = guard.0.take().unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_child_within(child, Duration::from_secs(20));
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !Path::new(&format!("/proc/{vmm}")).exists(),
        "the VMM outlived its jail"
    );
    assert_eq!(entries(&root), ["tiny.elf"], "{stderr}");
    assert!(!cgroup_dir.exists(), "cgroup left behind");
    // Removing what the client put in leaves nothing.
    std::fs::remove_dir_all(&jail_dir).unwrap();
}

#[test]
fn jailer_refuses_what_it_cannot_honour_before_making_anything() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let jailer = link(dir.path(), "jailer");
    let firecracker = link(dir.path(), "firecracker");
    let other = dir.path().join("other-vmm");
    std::fs::write(&other, "#!/bin/sh\n").unwrap();
    let base = dir.path().join("jails");
    let run = |exec: &Path, extra: &[&str]| {
        Command::new(&jailer)
            .args(["--id", "refused", "--exec-file"])
            .arg(exec)
            .args(["--uid", "10124", "--gid", "10124", "--chroot-base-dir"])
            .arg(&base)
            .args(extra)
            .output()
            .unwrap()
    };
    for (exec, extra, why) in [
        (&other, &[][..], "is not this dormouse binary"),
        (
            &firecracker,
            &["--resource-limit", "nproc=1"][..],
            "not supported",
        ),
        (
            &firecracker,
            &["--parent-cgroup", "x"][..],
            "--parent-cgroup without --cgroup",
        ),
        (
            &firecracker,
            &["--", "--boot-timer"][..],
            "--boot-timer is not supported",
        ),
    ] {
        let out = run(exec, extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{extra:?} accepted");
        assert!(stderr.contains(why), "{extra:?}: {stderr}");
    }
    assert!(!base.join("firecracker").join("refused").exists());
    // `dormouse jailer --version` and the link answer alike.
    let version = Command::new(&jailer).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("Jailer v1."));
}
