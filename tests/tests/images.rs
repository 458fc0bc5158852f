//! End-to-end tests of the real guest images (deploy/build-rootfs.sh `--from debian` and
//! `--from oci:`), through the sandbox library, with the real guest kernel and its drivers.
//!
//! The Debian image is booted once per test process by `dormouse template create` (the
//! command `deploy/build-template.sh` uses) and checkpointed; every Debian test restores a
//! sandbox from that template. Everything runs inside a network namespace of its own: the
//! template's eth0 is on a TAP set up by deploy/net.sh (NAT included), a dnsmasq answers names
//! on the gateway address, and a server sits in a second namespace behind that NAT, so the
//! network test shows name resolution and NAT with nothing reaching outside the machine.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tests::*;
use vmm_sandbox::{
    AgentCode, BootSpec, DiskSpec, ExecCommand, ExecOutput, Isolation, ManagerConfig,
    NetworkConfig, SandboxConfig, SandboxId, SandboxManager, SandboxSource, WriteOptions,
};

const TAP: &str = "dmimg0";
const HOST_IP: &str = "172.30.0.1";
const GUEST_IP: &str = "172.30.0.2";
const SERVER_IP: &str = "10.99.0.2";
const NAT_IP: &str = "10.99.0.1";
const SERVER_PORT: u16 = 8080;
const SERVER_NAME: &str = "server.test";

/// The guests of this file take turns: a guest whose kernel is emulated is CPU-bound.
fn guest_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs deploy/build-rootfs.sh with `args` and returns the image it printed.
fn build_image(args: &[&str]) -> PathBuf {
    let started = std::time::Instant::now();
    let out = Command::new(repo_root().join("deploy/build-rootfs.sh"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("running deploy/build-rootfs.sh");
    assert!(
        out.status.success(),
        "deploy/build-rootfs.sh {args:?} failed"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let image = PathBuf::from(stdout.lines().last().expect("the image path").trim());
    assert!(image.is_file(), "{} is not a file", image.display());
    eprintln!(
        "build-rootfs.sh {args:?}: {} in {:.1?}",
        image.display(),
        started.elapsed()
    );
    image
}

/// The namespaces, the TAP with NAT, dnsmasq and the server; torn down when the process ends
/// (the namespaces are deleted by `NetNs`'s drop only for non-static values, so the statics'
/// names carry the pid and a rerun deletes a leftover first).
struct Network {
    ns: NetNs,
    _server_ns: NetNs,
    /// The peer address the server saw, per connection.
    peers: std::sync::mpsc::Receiver<String>,
}

/// dnsmasq answering `SERVER_NAME` on the gateway address, started from a thread that lives as
/// long as the process, with PR_SET_PDEATHSIG: a test process that is killed takes it along.
fn spawn_dnsmasq(ns: &NetNs) -> u32 {
    let mut command = Command::new(dnsmasq_path());
    command
        .args(["--keep-in-foreground", "--no-resolv", "--no-hosts"])
        .args(["--conf-file=/dev/null", "--bind-interfaces", "--user=root"])
        .arg(format!("--listen-address={HOST_IP}"))
        .arg(format!("--address=/{SERVER_NAME}/{SERVER_IP}"))
        .arg("--pid-file=")
        .pre_exec_netns(ns);
    // SAFETY: the hook only calls prctl(2), async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let (sender, receiver) = std::sync::mpsc::channel::<Child>();
    std::thread::spawn(move || {
        let child = command.spawn().expect("starting dnsmasq");
        sender.send(child).unwrap();
        // The death signal fires when the thread that forked the child ends: this one never
        // does, until the process exits.
        loop {
            std::thread::park();
        }
    });
    receiver.recv().unwrap().id()
}

/// The names torn down at exit: dnsmasq's pid and the two namespaces (the TAP, the veth pair
/// and the NAT rules go with them).
static TEARDOWN: OnceLock<(u32, String, String)> = OnceLock::new();

fn register_teardown(ns: &NetNs, server_ns: &NetNs, dnsmasq: u32) {
    let _ = TEARDOWN.set((dnsmasq, ns.name.clone(), server_ns.name.clone()));
    // SAFETY: registers a handler that takes no arguments and never unwinds.
    unsafe { libc::atexit(teardown) };
}

extern "C" fn teardown() {
    if let Some((dnsmasq, ns, server_ns)) = TEARDOWN.get() {
        // SAFETY: kill(2) on a pid this process started.
        unsafe { libc::kill(*dnsmasq as libc::pid_t, libc::SIGKILL) };
        for name in [ns, server_ns] {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn network() -> &'static Mutex<Network> {
    static NETWORK: OnceLock<Mutex<Network>> = OnceLock::new();
    NETWORK.get_or_init(|| {
        remove_stale_namespaces();
        let ns = NetNs::new("img");
        let server_ns = NetNs::new("imgsrv");
        let status = Command::new(repo_root().join("deploy/net.sh"))
            .args(["up", TAP, "--host-ip", &format!("{HOST_IP}/30")])
            .args(["--guest-ip", GUEST_IP, "--dns", HOST_IP])
            .pre_exec_netns(&ns)
            .status()
            .expect("deploy/net.sh");
        assert!(status.success(), "deploy/net.sh up failed");
        // A veth pair: our side is the NAT's outside address, the server's side its peer.
        let host_side = format!("dmiv0{}", std::process::id() % 10000);
        let status = Command::new("ip")
            .args(["link", "add", &host_side, "netns", &ns.name, "type", "veth"])
            .args(["peer", "name", "dmiv1", "netns", &server_ns.name])
            .status()
            .unwrap();
        assert!(status.success(), "ip link add veth");
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{NAT_IP}/24"),
            "dev",
            &host_side,
        ]);
        ns.exec(&["ip", "link", "set", &host_side, "up"]);
        server_ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            "dmiv1",
        ]);
        server_ns.exec(&["ip", "link", "set", "dmiv1", "up"]);

        let dnsmasq = spawn_dnsmasq(&ns);
        register_teardown(&ns, &server_ns, dnsmasq);

        let (peer_sender, peers) = std::sync::mpsc::channel();
        let (bound_sender, bound) = std::sync::mpsc::channel();
        let server_ns_path = format!("/var/run/netns/{}", server_ns.name);
        std::thread::spawn(move || {
            enter_netns(&server_ns_path);
            let listener = TcpListener::bind((SERVER_IP, SERVER_PORT)).expect("bind the server");
            bound_sender.send(()).unwrap();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let peer = stream
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                use std::io::Write;
                let _ = writeln!(stream, "hello from the server, you are {peer}");
                let _ = peer_sender.send(peer);
            }
        });
        bound.recv_timeout(Duration::from_secs(10)).unwrap();
        Mutex::new(Network {
            ns,
            _server_ns: server_ns,
            peers,
        })
    })
}

/// Namespaces of earlier runs that were killed before their teardown ran.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix("dm-imgsrv-")
            .or_else(|| name.strip_prefix("dm-img-"))
            .and_then(|pid| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } == -1
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn dnsmasq_path() -> PathBuf {
    for candidate in ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"] {
        if Path::new(candidate).is_file() {
            return candidate.into();
        }
    }
    panic!("dnsmasq is not installed: deploy/setup.sh installs dnsmasq-base");
}

/// Moves the calling thread into the network namespace at `path`; threads and processes it
/// starts afterwards are in it too.
fn enter_netns(path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns on a namespace file we hold open; affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

trait NetnsCommand {
    fn pre_exec_netns(&mut self, ns: &NetNs) -> &mut Self;
}

impl NetnsCommand for Command {
    /// The child enters `ns` before it execs (the parent thread stays where it is).
    fn pre_exec_netns(&mut self, ns: &NetNs) -> &mut Self {
        use std::os::unix::process::CommandExt;
        let file = std::fs::File::open(format!("/var/run/netns/{}", ns.name)).unwrap();
        // SAFETY: the hook only calls setns(2) on a descriptor opened before the fork.
        unsafe {
            self.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
        }
    }
}

struct DebianTemplate {
    dir: PathBuf,
    /// The sandbox id the template booted as: its guest hostname.
    hostname: String,
    _keep: tempfile::TempDir,
}

/// Builds the Debian image, and boots and checkpoints it once with `dormouse template create`
/// in the test namespace.
fn debian_template() -> &'static DebianTemplate {
    static TEMPLATE: OnceLock<DebianTemplate> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let image = build_image(&["--from", "debian"]);
        let _guard = guest_lock();
        let network = network().lock().unwrap();
        let keep = run_tempdir();
        let dir = keep.path().join("base");
        let out = Command::new(dormouse_bin())
            .args(["template", "create", "--kernel"])
            .arg(vmlinux())
            .arg("--rootfs")
            .arg(&image)
            .arg("--out")
            .arg(&dir)
            .args(["--mem", "256", "--tap", TAP])
            .args(["--guest-ip", &format!("{GUEST_IP}/30,{HOST_IP}")])
            .args(["--dns", HOST_IP, "--warm", "bash -c true"])
            .pre_exec_netns(&network.ns)
            .stderr(Stdio::inherit())
            .output()
            .expect("dormouse template create");
        assert!(out.status.success(), "dormouse template create failed");
        let summary = String::from_utf8(out.stdout).unwrap();
        eprintln!("template: {summary}");
        let hostname = summary
            .split("\"sandbox_id\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("the summary names the sandbox")
            .to_owned();
        assert!(dir.join("state.bin").is_file());
        assert!(dir.join(vmm_sandbox::SANDBOX_FILE).is_file());
        DebianTemplate {
            dir,
            hostname,
            _keep: keep,
        }
    })
}

/// A sandbox from the Debian template on the test TAP, for `body`; killed afterwards.
fn with_debian_sandbox<F>(body: F)
where
    F: for<'a> FnOnce(&'a SandboxManager, &'a SandboxId) -> futures_like::BoxFuture<'a>,
{
    if !require_kvm() || !require_root() {
        return;
    }
    let template = debian_template();
    let _guard = guest_lock();
    let network = network().lock().unwrap();
    enter_netns(&format!("/var/run/netns/{}", network.ns.name));
    let work = run_tempdir();
    runtime().block_on(async {
        let manager = SandboxManager::new(
            ManagerConfig::new(work.path().join("work")).with_isolation(Isolation::InProcess),
        )
        .unwrap();
        let mut config = SandboxConfig::template(&template.dir);
        config.network = vec![NetworkConfig {
            tap: TAP.to_owned(),
            mac: None,
            guest_ip: None,
        }];
        config.agent_timeout = Duration::from_secs(120);
        let id = manager.create(config).await.unwrap();
        body(&manager, &id).await;
        manager.kill(&id).await.unwrap();
    });
    drop(network);
}

mod futures_like {
    pub type BoxFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>;
}

async fn run(manager: &SandboxManager, id: &SandboxId, command: ExecCommand) -> ExecOutput {
    let shown = format!("{:?}", command.spec());
    let out = manager.exec(id, &command).await.unwrap();
    assert!(
        out.success(),
        "{shown}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        out.stdout_lossy(),
        out.stderr_lossy()
    );
    out
}

fn bash(script: &str) -> ExecCommand {
    ExecCommand::new("bash").args(["-c", script])
}

#[test]
fn debian_userland_runs_the_workers_commands() {
    let hostname = debian_template().hostname.clone();
    with_debian_sandbox(move |manager, id| {
        Box::pin(async move {
            let out = run(manager, id, bash("cat <<< here-string")).await;
            assert_eq!(out.stdout_lossy(), "here-string\n");
            let out = run(manager, id, bash("seq 1 10000 | wc -l")).await;
            assert_eq!(out.stdout_lossy().trim(), "10000");
            let out = run(
                manager,
                id,
                ExecCommand::new("base64").stdin(b"dormouse \x00\xff".to_vec()),
            )
            .await;
            assert_eq!(out.stdout_lossy(), "ZG9ybW91c2UgAP8=\n");
            let out = run(manager, id, ExecCommand::new("hostname")).await;
            assert_eq!(out.stdout_lossy().trim(), hostname);
            let out = run(manager, id, ExecCommand::new("whoami")).await;
            assert_eq!(out.stdout_lossy(), "root\n");
            let out = run(manager, id, ExecCommand::new("apt-get").arg("--version")).await;
            assert!(
                out.stdout_lossy().starts_with("apt "),
                "{}",
                out.stdout_lossy()
            );
            // No exec defaults in a Debian image: root's home is the working directory.
            let out = run(manager, id, ExecCommand::new("pwd")).await;
            assert_eq!(out.stdout_lossy(), "/root\n");
        })
    });
}

#[test]
fn debian_moves_a_mebibyte_of_awkward_bytes_both_ways() {
    // Quotes, shell metacharacters, NULs, invalid UTF-8, CR/LF, and every byte value.
    let mut content = Vec::with_capacity(1 << 20);
    let awkward: &[u8] = b"'\"`$(rm -rf /)\\\n\r\n\0\xff\xfe\xc3\x28 \xe2\x82\xac\t%s%n{}";
    let mut counter = 0u32;
    while content.len() < (1 << 20) {
        content.extend_from_slice(awkward);
        content.extend_from_slice(&counter.to_le_bytes());
        content.extend((0..=255u8).map(|b| b.wrapping_add(counter as u8)));
        counter += 1;
    }
    content.truncate(1 << 20);
    let expected = sha256_hex(&content);
    with_debian_sandbox(move |manager, id| {
        Box::pin(async move {
            let path = "/tmp/awkward 'name' $x.bin";
            manager
                .write_file(id, path, &content, WriteOptions::default())
                .await
                .unwrap();
            let out = run(
                manager,
                id,
                ExecCommand::new("sha256sum").arg(path).cwd("/tmp"),
            )
            .await;
            assert!(
                out.stdout_lossy().starts_with(&expected),
                "the guest hashed {} (host: {expected})",
                out.stdout_lossy()
            );
            // The guest writes a copy with its own tools; it comes back byte for byte.
            run(
                manager,
                id,
                bash("cp -- \"/tmp/awkward 'name' \\$x.bin\" /root/copy.bin"),
            )
            .await;
            let back = manager.read_file(id, "/root/copy.bin").await.unwrap();
            assert_eq!(back.len(), content.len());
            assert_eq!(sha256_hex(&back), expected);
        })
    });
}

#[test]
fn debian_resolves_names_and_reaches_a_server_through_the_hosts_nat() {
    with_debian_sandbox(|manager, id| {
        Box::pin(async move {
            let resolv = manager.read_file(id, "/etc/resolv.conf").await.unwrap();
            assert!(
                String::from_utf8_lossy(&resolv).contains(&format!("nameserver {HOST_IP}")),
                "{}",
                String::from_utf8_lossy(&resolv)
            );
            let out = run(
                manager,
                id,
                ExecCommand::new("ping").args(["-c", "1", "-W", "10", HOST_IP]),
            )
            .await;
            assert!(
                out.stdout_lossy().contains("1 received"),
                "{}",
                out.stdout_lossy()
            );
            let out = run(
                manager,
                id,
                ExecCommand::new("getent").args(["hosts", SERVER_NAME]),
            )
            .await;
            assert!(
                out.stdout_lossy().starts_with(SERVER_IP),
                "{}",
                out.stdout_lossy()
            );
            let out = run(
                manager,
                id,
                bash(&format!(
                    "exec 3<>/dev/tcp/{SERVER_NAME}/{SERVER_PORT}; timeout 20 head -n 1 <&3"
                )),
            )
            .await;
            // The server saw the NAT's outside address, not the guest's.
            assert_eq!(
                out.stdout_lossy(),
                format!("hello from the server, you are {NAT_IP}\n")
            );
        })
    });
    if require_kvm() && require_root() {
        let network = network().lock().unwrap();
        let peer = network.peers.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(peer, NAT_IP);
    }
}

/// The OCI test image: two layers, the second deleting a file of the first (a whiteout), and a
/// config with `Env`, `WorkingDir` and `User`. Booted once (no template: one test uses it).
#[test]
fn oci_image_honours_whiteouts_and_its_config() {
    if !require_kvm() || !require_root() {
        return;
    }
    let scratch = run_tempdir();
    let out = Command::new(repo_root().join("deploy/build-oci-test-image.sh"))
        .arg(scratch.path().join("layout"))
        .stderr(Stdio::inherit())
        .output()
        .expect("deploy/build-oci-test-image.sh");
    assert!(
        out.status.success(),
        "deploy/build-oci-test-image.sh failed"
    );
    let layout = String::from_utf8(out.stdout).unwrap();
    let layout = layout.lines().last().unwrap().trim().to_owned();
    let image = build_image(&["--from", &format!("oci:{layout}")]);

    let _guard = guest_lock();
    runtime().block_on(async {
        let manager = SandboxManager::new(
            ManagerConfig::new(scratch.path().join("work")).with_isolation(Isolation::InProcess),
        )
        .unwrap();
        let mut spec = BootSpec::new(vmlinux());
        spec.rootfs = Some(DiskSpec::copy_of(&image));
        spec.mem_mib = 128;
        let mut config = SandboxConfig::from_source(SandboxSource::Boot(spec));
        config.agent_timeout = LINUX_BOOT_TIMEOUT;
        let console = scratch.path().join("console.log");
        config.console_log = Some(console.clone());
        let id = manager.create(config).await.unwrap_or_else(|e| {
            panic!(
                "booting the OCI image: {e}\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            )
        });

        // The whiteout removed the first layer's file; the second layer's file is there.
        let err = manager
            .read_file(&id, "/etc/doomed.txt")
            .await
            .expect_err("/etc/doomed.txt was deleted by the second layer");
        assert_eq!(err.agent_code(), Some(AgentCode::NotFound), "{err}");
        let second = manager.read_file(&id, "/etc/layer2.txt").await.unwrap();
        assert_eq!(String::from_utf8_lossy(&second).trim(), "second layer");

        // Env, WorkingDir and User from the image config are the exec defaults.
        let out = run(
            &manager,
            &id,
            ExecCommand::shell("echo \"$GREETING\"; pwd; id -u; id -g"),
        )
        .await;
        assert_eq!(out.stdout_lossy(), "hello from oci\n/work\n1000\n1000\n");
        // A request's own settings win.
        let out = run(
            &manager,
            &id,
            ExecCommand::shell("echo \"$GREETING\"; pwd; id -u")
                .env("GREETING", "mine")
                .cwd("/")
                .user("root"),
        )
        .await;
        assert_eq!(out.stdout_lossy(), "mine\n/\n0\n");
        manager.kill(&id).await.unwrap();
    });
}
