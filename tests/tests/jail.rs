//! End-to-end: `dormouse jail` (docs/security.md, "Jail"). Needs root and KVM (with `CI` set,
//! missing either fails loudly).
//!
//! 1. The idle tiny guest (no Linux boot) jailed with cgroup v1 limits, rlimits and a new PID
//!    namespace: the VMM process runs under the uid/gid given, in the cgroups given with the
//!    values given, with the rlimits, no_new_privs and seccomp; its root holds only what the jail
//!    made; it runs in the network namespace given with the TAP the jail opened there; a SIGTERM
//!    to the supervisor stops it cleanly, and then the jail directory, the cgroups and the TAP
//!    are gone.
//! 2. A Linux guest with the agent (initrd) booted once in a jail: exec through the hybrid vsock
//!    socket at `<base>/<id>/root/v.sock`, a snapshot to a "host path" lands inside the jail and
//!    is kept after shutdown (everything else goes), then restored in a second jail and exec'd.
//! 3. A seccomp violation ends a jail with 159; a SIGKILLed supervisor takes its VMM along; the
//!    memory and file-size limits hold; `--daemonize` returns at once, its detached supervisor
//!    (a session leader named in the lock file) keeps supervising and cleans up.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_client::{AgentClient, ExecCommand};
use tests::*;
use vmm_api::client::ApiClient;

const UID: u32 = 10123;
const AGENT_PORT: u32 = 1024;

fn ready() -> bool {
    require_kvm() && require_root()
}

fn jail_command(base: &Path, id: &str, uid: u32, extra: &[&str], command: &[&str]) -> Command {
    let mut cmd = Command::new(dormouse_bin());
    let uid = uid.to_string();
    cmd.args([
        "jail",
        "--id",
        id,
        "--uid",
        &uid,
        "--gid",
        &uid,
        "--chroot-base",
    ])
    .arg(base)
    .args(extra)
    .arg("--")
    .args(command);
    cmd
}

/// The pid of `parent`'s only child (the jailed VMM under its supervisor).
fn child_of(parent: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            return pid.parse().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the supervisor {parent} has no child"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_path(path: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the jail ended early:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "no {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ctl(sock: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["ctl", "--sock", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    run_dormouse(&all, Duration::from_secs(120))
}

struct Killed(Option<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // SIGTERM: the supervisor passes it on and cleans up.
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

#[test]
fn tiny_guest_in_a_jail_has_the_uid_cgroups_and_limits_given() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny-idle.elf");
    vmm::tiny_guest::write_to(&kernel, vmm::tiny_guest::TinyGuestEnd::Idle).unwrap();
    let base = dir.path().join("jails");
    let id = format!("tiny-{}", std::process::id());
    let log = dir.path().join("jail.log");
    // The VMM runs in this network namespace and gets a TAP the jail opened there.
    let netns = NetNs::new("jail");
    let netns_path = format!("/var/run/netns/{}", netns.name);
    let started = Instant::now();
    let child = jail_command(
        &base,
        &id,
        UID,
        &[
            "--netns",
            &netns_path,
            "--cgroup-version",
            "1",
            "--cgroup",
            "cpu.cfs_quota_us=50000",
            "--cgroup",
            "cpu.cfs_period_us=100000",
            "--cgroup",
            "memory.limit_in_bytes=268435456",
            "--cgroup",
            "pids.max=64",
            "--rlimit",
            "nofile=256,fsize=1073741824",
            "--new-pid-ns",
        ],
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem-mib",
            "64",
            "--console",
            "null",
            "--api-sock",
            "/api.sock",
            "--net",
            "tap=jt0",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .unwrap();
    let supervisor = child.id();
    let mut guard = Killed(Some(child));
    let root = base.join(&id).join("root");
    let sock = root.join("api.sock");
    wait_path(&sock, guard.0.as_mut().unwrap(), &log);
    wait_for_socket(&sock);
    eprintln!(
        "jail e2e: jailed tiny guest up in {:.2?}",
        started.elapsed()
    );

    let vmm = child_of(supervisor);
    let uid = UID.to_string();
    assert_eq!(status_field(vmm, "Uid"), [uid.as_str(); 4].join(" "));
    assert_eq!(status_field(vmm, "Gid"), [uid.as_str(); 4].join(" "));
    assert_eq!(status_field(vmm, "Groups"), "");
    assert_eq!(status_field(vmm, "NoNewPrivs"), "1");
    assert_eq!(status_field(vmm, "CapEff"), "0000000000000000");
    assert_eq!(status_field(vmm, "CapPrm"), "0000000000000000");
    // The main thread installs its filter once the VM is built and the API socket is served.
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_field(vmm, "Seccomp") != "2" {
        assert!(
            Instant::now() < deadline,
            "the VMM's main thread has no seccomp filter"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // PID 1 of its own namespace.
    assert_eq!(status_field(vmm, "NSpid"), format!("{vmm} 1"));

    // In the namespace given, holding the TAP the jail opened there (no /dev/net/tun inside).
    let ns_inode = |p: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    assert_eq!(
        ns_inode(&format!("/proc/{vmm}/ns/net")),
        ns_inode(&netns_path)
    );
    let tap_there = Command::new("ip")
        .args(["netns", "exec", &netns.name, "ip", "link", "show", "jt0"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(tap_there.success(), "no jt0 in the namespace");
    // (Opened before pivot_root: the link names it within the detached /dev mount.)
    let links: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{vmm}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .collect();
    assert!(
        links.iter().any(|l| l.ends_with("net/tun")),
        "the VMM holds no TAP: {links:?}"
    );

    // The cgroups given, with the values given, and the VMM in them.
    let cgroups = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    let want = format!("/dormouse/{id}");
    for controller in ["cpu", "memory", "pids"] {
        assert!(
            cgroups.lines().any(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
                ctrls.split(',').any(|c| c == controller) && path == want
            }),
            "{controller} not at {want}:\n{cgroups}"
        );
    }
    let cg = |controller: &str, file: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{controller}/dormouse/{id}/{file}"))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(cg("cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(cg("cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(cg("memory", "memory.limit_in_bytes"), "268435456");
    assert_eq!(cg("pids", "pids.max"), "64");
    assert!(cg("memory", "cgroup.procs")
        .lines()
        .any(|p| p == vmm.to_string()));
    // The supervisor stays outside.
    assert!(!cg("memory", "cgroup.procs")
        .lines()
        .any(|p| p == supervisor.to_string()));

    let limits = std::fs::read_to_string(format!("/proc/{vmm}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name}:\n{limits}"))[name.len()..]
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(limit("Max open files"), "256 256");
    assert_eq!(limit("Max file size"), "1073741824 1073741824");

    // Its root holds what the jail made and the socket it made; nothing of the host.
    let vmm_root = PathBuf::from(format!("/proc/{vmm}/root"));
    let mut want_root = vec!["api.sock", "dev", "inputs", "proc", "tmp"];
    if Path::new("/sys/module/kvm_pvm").exists() {
        want_root.push("sys");
        want_root.sort();
    }
    assert_eq!(entries(&vmm_root), want_root);
    assert_eq!(entries(&vmm_root.join("dev")), ["kvm"]);
    assert_eq!(entries(&vmm_root.join("inputs")), ["0-tiny-idle.elf"]);
    assert!(!vmm_root.join("etc").exists() && !vmm_root.join("usr").exists());
    // The procfs inside shows only the jail's PID namespace.
    let pids: Vec<String> = entries(&vmm_root.join("proc"))
        .into_iter()
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    assert!(
        pids.iter().all(|p| p.parse::<u32>().unwrap() < 100),
        "{pids:?}"
    );
    assert!(pids.contains(&"1".to_string()), "{pids:?}");

    // A second jail with this id is refused while this one runs; uid 0 is refused.
    let out = jail_command(
        &base,
        &id,
        UID,
        &[],
        &["run", "--kernel", kernel.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is running"), "{stderr}");
    let out = jail_command(
        &base,
        "other",
        0,
        &[],
        &["run", "--kernel", kernel.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--uid 0 is refused"), "{stderr}");
    assert!(!base.join("other").exists());

    // SIGTERM to the supervisor: it passes it on, the VMM stops cleanly, the jail is removed.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(supervisor as i32, libc::SIGTERM) };
    let (status, _) = wait_child_within(guard.0.take().unwrap(), Duration::from_secs(20));
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("passed to the jailed VMM"), "{log_text}");
    assert_eq!(status.code(), Some(0), "{log_text}");
    assert!(
        !base.join(&id).exists(),
        "the jail directory stays:\n{log_text}"
    );
    // The TAP was the VMM's only: it went with it.
    let gone = Command::new("ip")
        .args(["netns", "exec", &netns.name, "ip", "link", "show", "jt0"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!gone.success(), "jt0 outlived the VM");
    for controller in ["cpu", "memory", "pids"] {
        let cgroup = PathBuf::from(format!("/sys/fs/cgroup/{controller}/dormouse/{id}"));
        assert!(!cgroup.exists(), "{} stays", cgroup.display());
    }
    eprintln!(
        "jail e2e: tiny guest case done in {:.2?}",
        started.elapsed()
    );
}

/// The agent initrd: the generated /init mounts the basics and `exec`s the agent (PID 1).
fn agent_initrd(dir: &Path) -> PathBuf {
    let agent = static_guest_binary("agent", "dormouse-agent");
    build_initrd_adding(
        dir,
        "agent.cpio",
        "exec /bin/dormouse-agent",
        &[(&agent, "/bin/dormouse-agent")],
    )
}

fn exec_hybrid(uds: &Path, word: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let agent = AgentClient::connect_hybrid_vsock(uds, AGENT_PORT)
            .await
            .unwrap_or_else(|e| panic!("hybrid vsock at {}: {e}", uds.display()));
        let out = agent
            .exec(&ExecCommand::new("echo").arg(word))
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

#[test]
fn linux_guest_boots_snapshots_and_restores_in_jails() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = agent_initrd(dir.path());
    let _lock = linux_boot_lock();
    let base = dir.path().join("jails");
    let id = format!("agent-{}", std::process::id());
    let log = dir.path().join("boot.log");
    let started = Instant::now();
    let child = jail_command(
        &base,
        &id,
        UID + 1,
        &["--new-pid-ns"],
        &[
            "run",
            "--kernel",
            vmlinux().to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem-mib",
            "256",
            "--vsock",
            "cid=7,uds=/v.sock",
            "--api-sock",
            "/api.sock",
            "--console",
            "null",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .unwrap();
    let mut guard = Killed(Some(child));
    let root = base.join(&id).join("root");
    let sock = root.join("api.sock");
    wait_path(&sock, guard.0.as_mut().unwrap(), &log);
    ApiClient::new(&sock)
        .wait_agent(LINUX_BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("agent: {e}\n{}", std::fs::read_to_string(&log).unwrap()));
    eprintln!(
        "jail e2e: jailed Linux guest ready in {:.2?}",
        started.elapsed()
    );
    assert_eq!(exec_hybrid(&root.join("v.sock"), "jailed"), "jailed\n");

    // A snapshot asked for at a host path lands inside the jail.
    let escape = format!("/tmp/escape-{}", std::process::id());
    let out = ctl(&sock, &["snapshot", "--dir", &escape]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(
        !Path::new(&escape).exists(),
        "the snapshot escaped the jail"
    );
    let snapshot = root.join(escape.trim_start_matches('/'));
    assert!(snapshot.join("state.bin").exists());
    let out = ctl(&sock, &["shutdown"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let (status, _) = wait_child_within(guard.0.take().unwrap(), Duration::from_secs(30));
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{log_text}");
    // Kept: the snapshot (and named in the log); gone: everything the jail or the VMM made.
    assert!(snapshot.join("memory.bin").exists());
    assert!(
        log_text.contains(&format!("kept {}", snapshot.display())),
        "{log_text}"
    );
    assert_eq!(entries(&root), ["tmp"]);
    assert_eq!(entries(&base.join(&id)), ["root"]);

    // Restored in a second jail (the same uid: the snapshot's files are its, 0600).
    let id2 = format!("agent2-{}", std::process::id());
    let log2 = dir.path().join("restore.log");
    let restore_started = Instant::now();
    let child = jail_command(
        &base,
        &id2,
        UID + 1,
        &[],
        &[
            "restore",
            "--dir",
            snapshot.to_str().unwrap(),
            "--vsock-uds",
            "/v2.sock",
            "--api-sock",
            "/api.sock",
            "--console",
            "null",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log2).unwrap())
    .spawn()
    .unwrap();
    let mut guard = Killed(Some(child));
    let root2 = base.join(&id2).join("root");
    let sock2 = root2.join("api.sock");
    wait_path(&sock2, guard.0.as_mut().unwrap(), &log2);
    ApiClient::new(&sock2)
        .wait_agent(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("agent: {e}\n{}", std::fs::read_to_string(&log2).unwrap()));
    assert_eq!(
        exec_hybrid(&root2.join("v2.sock"), "restored"),
        "restored\n"
    );
    eprintln!(
        "jail e2e: restored in a jail and exec'd in {:.2?}",
        restore_started.elapsed()
    );
    let out = ctl(&sock2, &["shutdown"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let (status, _) = wait_child_within(guard.0.take().unwrap(), Duration::from_secs(30));
    let log_text = std::fs::read_to_string(&log2).unwrap();
    assert_eq!(status.code(), Some(0), "{log_text}");
    assert!(!base.join(&id2).exists(), "{log_text}");
    assert!(
        snapshot.join("state.bin").exists(),
        "the restore left its snapshot alone"
    );
    eprintln!("jail e2e: Linux case done in {:.2?}", started.elapsed());
}

/// seccomp enforces inside the jail, and a violation's status (159) and message reach the
/// jail's caller; the jail is cleaned up after a killed VMM too.
#[test]
fn a_seccomp_violation_in_a_jail_ends_it_with_159() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny-idle.elf");
    vmm::tiny_guest::write_to(&kernel, vmm::tiny_guest::TinyGuestEnd::Idle).unwrap();
    let base = dir.path().join("jails");
    let id = format!("seccomp-{}", std::process::id());
    let child = jail_command(
        &base,
        &id,
        UID,
        &["--new-pid-ns"],
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem-mib",
            "16",
            "--console",
            "null",
            "--api-sock",
            "/api.sock",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let sock = base.join(&id).join("root/api.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_for_socket(&sock);
    let (status, _) = api_request(
        &sock,
        "PUT",
        "/v1/fault",
        r#"{"thread": "vcpu", "fault": "syscall"}"#,
    );
    assert!(
        !status.contains(" 404 "),
        "this dormouse has no fault injection: build it with the workspace's tests \
         (`cargo build --workspace --tests`, as deploy/test.sh does)"
    );
    let (status, stderr) = wait_child_within(child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(159), "{stderr}");
    assert!(
        stderr.contains("seccomp violation: thread vcpu called syscall"),
        "{stderr}"
    );
    assert!(!base.join(&id).exists(), "{stderr}");
}

/// A supervisor killed with SIGKILL takes its VMM with it; its leftovers make the next jail with
/// that id refuse, naming the directory (nothing is deleted for the operator).
#[test]
fn a_killed_supervisor_takes_the_vmm_along_and_its_leftovers_are_reported() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny-idle.elf");
    vmm::tiny_guest::write_to(&kernel, vmm::tiny_guest::TinyGuestEnd::Idle).unwrap();
    let base = dir.path().join("jails");
    let id = format!("killed-{}", std::process::id());
    let args = [
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--mem-mib",
        "16",
        "--console",
        "null",
        "--api-sock",
        "/api.sock",
    ];
    let mut child = jail_command(&base, &id, UID, &[], &args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sock = base.join(&id).join("root/api.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let vmm = child_of(child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{vmm}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the VMM {vmm} outlived its supervisor"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = jail_command(&base, &id, UID, &[], &args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no jail holds it"), "{stderr}");
    assert!(
        stderr.contains(&base.join(&id).display().to_string()),
        "{stderr}"
    );
    assert!(base.join(&id).join("root/dev/kvm").exists(), "left alone");
}

/// The limits hold: a guest that touches more memory than the cgroup allows gets the VMM
/// OOM-killed (the jail's status says so: 128 + SIGKILL); a snapshot larger than the file-size
/// rlimit fails with EFBIG while the VM carries on (SIGXFSZ is ignored in the jail).
#[test]
fn memory_and_file_size_limits_hold() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("jails");

    let toucher = dir.path().join("tiny-touch.elf");
    vmm::tiny_guest::write_to(
        &toucher,
        vmm::tiny_guest::TinyGuestEnd::TouchAll {
            mem_bytes: 128 << 20,
        },
    )
    .unwrap();
    let id = format!("oom-{}", std::process::id());
    let out = jail_command(
        &base,
        &id,
        UID,
        &[
            "--cgroup-version",
            "1",
            "--cgroup",
            "memory.limit_in_bytes=50331648",
        ],
        &[
            "run",
            "--kernel",
            toucher.to_str().unwrap(),
            "--mem-mib",
            "128",
            "--console",
            "null",
        ],
    )
    .stdin(Stdio::null())
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGKILL), "{stderr}");
    assert!(!base.join(&id).exists(), "{stderr}");
    assert!(!Path::new(&format!("/sys/fs/cgroup/memory/dormouse/{id}")).exists());

    let idle = dir.path().join("tiny-idle.elf");
    vmm::tiny_guest::write_to(&idle, vmm::tiny_guest::TinyGuestEnd::Idle).unwrap();
    let id = format!("fsize-{}", std::process::id());
    let log = dir.path().join("fsize.log");
    let child = jail_command(
        &base,
        &id,
        UID,
        &["--rlimit", "fsize=1048576"],
        &[
            "run",
            "--kernel",
            idle.to_str().unwrap(),
            "--mem-mib",
            "64",
            "--console",
            "null",
            "--api-sock",
            "/api.sock",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .unwrap();
    let mut guard = Killed(Some(child));
    let sock = base.join(&id).join("root/api.sock");
    wait_path(&sock, guard.0.as_mut().unwrap(), &log);
    wait_for_socket(&sock);
    // memory.bin is 64 MiB long (sparse): beyond the 1 MiB limit.
    let out = ctl(&sock, &["snapshot", "--dir", "/tmp/too-big"]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("File too large"),
        "{stdout}{stderr}"
    );
    let out = ctl(&sock, &["info"]);
    assert!(out.status.success(), "the VM goes on: {:?}", text(&out));
    let out = ctl(&sock, &["shutdown"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let (status, _) = wait_child_within(guard.0.take().unwrap(), Duration::from_secs(20));
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{log_text}");
    assert!(!base.join(&id).exists(), "{log_text}");
}

#[test]
fn a_daemonized_jail_returns_at_once_and_still_supervises() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny-idle.elf");
    vmm::tiny_guest::write_to(&kernel, vmm::tiny_guest::TinyGuestEnd::Idle).unwrap();
    let base = dir.path().join("jails");
    let id = format!("daemon-{}", std::process::id());
    let out = jail_command(
        &base,
        &id,
        UID,
        &["--daemonize", "--new-pid-ns"],
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem-mib",
            "16",
            "--console",
            "null",
            "--api-sock",
            "/api.sock",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .output()
    .unwrap();
    // The command returns once the jail is prepared; the VM runs on in the background.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jail = base.join(&id);
    let sock = jail.join("root/api.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "no API socket from the daemonized jail"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_for_socket(&sock);
    let info = ctl(&sock, &["info"]);
    assert!(info.status.success(), "{info:?}");
    // The detached supervisor holds the lock (its pid is in the lock file) in a new session,
    // and its VMM runs under the uid given.
    let supervisor: u32 = std::fs::read_to_string(jail.join("jail.lock"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{supervisor}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    assert_eq!(
        fields[3],
        supervisor.to_string(),
        "not a session leader: {stat}"
    );
    // With --new-pid-ns the supervisor's child is the VMM, PID 1 of its namespace.
    let vmm = child_of(supervisor);
    assert_eq!(status_field(vmm, "Uid"), format!("{UID} {UID} {UID} {UID}"));
    // Shutting the VM down ends the detached supervisor's wait: it cleans up.
    let down = ctl(&sock, &["shutdown"]);
    assert!(down.status.success(), "{down:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while jail.exists() {
        assert!(
            Instant::now() < deadline,
            "the daemonized jail did not clean up: {:?}",
            jail.exists().then(|| entries(&jail))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
