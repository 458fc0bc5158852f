//! End-to-end: the guest agent as PID 1 in a real guest (ext4 rootfs from deploy/build-rootfs.sh
//! with the static agent as init), driven from the host through the VM's control-API socket:
//! `dormouse exec` / `dormouse cp`, and `agent_client` over `PUT /v1/vsock/connect` streams.
//!
//! ONE guest boot for the whole file (a Linux boot takes ~11 s or more on an emulating PVM
//! host), then every case runs against it, then one snapshot → restore checks that the agent
//! announces itself again to the restored VM. Each case prints a timing line.
//!
//! Guest work is kept small: a fork+exec costs ~0.45 s of emulated kernel time on a PVM host,
//! so 10,000 lines come from one `seq`, and file operations go through the agent (no fork).
//!
//! The static agent is built with `tests::static_guest_binary` (set DORMOUSE_GUEST_TOOLS_DIR to
//! reuse a target dir that already has it).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use agent_client::{AgentClient, ExecCommand, ExecEvent, ExitOutcome, WriteOptions};
use tests::*;
use tonic::Code;
use vmm_api::agent_link::connect_agent;
use vmm_api::client::ApiClient;

const CLI_TIMEOUT: Duration = Duration::from_secs(180);
const MIB: usize = 1024 * 1024;

/// A running `dormouse run`/`restore`, killed on drop.
struct Vm {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Vm {
    fn spawn(args: &[&str], sock: &Path, log: &Path) -> Vm {
        let log_file = std::fs::File::create(log).unwrap();
        let child = Command::new(dormouse_bin())
            .args(args)
            .arg("--api-sock")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn dormouse");
        Vm {
            child,
            sock: sock.to_path_buf(),
            log: log.to_path_buf(),
        }
    }

    fn api(&self) -> ApiClient {
        ApiClient::new(&self.sock)
    }

    /// Waits for the API socket, then for the agent's announcement (the readiness event).
    fn wait_ready(&mut self, timeout: Duration) -> vmm_api::AgentInfo {
        let deadline = Instant::now() + timeout;
        while !self.sock.exists() {
            assert!(Instant::now() < deadline, "no API socket");
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "dormouse ended early:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        self.api()
            .wait_agent(left)
            .unwrap_or_else(|e| panic!("agent not ready: {e}\n{}", self.log_text()))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn cli(&self, command: &str, args: &[&str]) -> Output {
        let sock = self.sock.to_str().unwrap();
        let mut all = vec![command, "--sock", sock];
        all.extend_from_slice(args);
        run_dormouse(&all, CLI_TIMEOUT)
    }

    fn exec(&self, args: &[&str]) -> Output {
        self.cli("exec", args)
    }

    fn exec_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(dormouse_bin());
        command.arg("exec").arg("--sock").arg(&self.sock).args(args);
        command
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn case(name: &str, f: impl FnOnce()) {
    let start = Instant::now();
    f();
    eprintln!("agent e2e: {name}: ok in {:.2?}", start.elapsed());
}

fn assert_exit(out: &Output, code: i32, what: &str) {
    let (stdout, stderr) = text(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit status\nstdout: {stdout}\nstderr: {stderr}"
    );
}

fn agent_rootfs(dir: &Path) -> PathBuf {
    let agent = static_guest_binary("agent", "dormouse-agent");
    let out = dir.join("agent-rootfs.ext4");
    let status = Command::new(repo_root().join("deploy/build-rootfs.sh"))
        .args(["--size", "64", "--init", "agent", "--agent"])
        .arg(&agent)
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running deploy/build-rootfs.sh");
    assert!(status.success(), "deploy/build-rootfs.sh --agent failed");
    out
}

#[test]
fn agent_as_init_in_a_real_guest() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = agent_rootfs(dir.path());
    let kernel = vmlinux();
    let _serial = linux_boot_lock();

    let sock = dir.path().join("api.sock");
    let console = dir.path().join("console.log");
    let mut vm = Vm::spawn(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--mem-mib",
            "256",
            "--vsock",
            "cid=3",
            "--console",
            console.to_str().unwrap(),
        ],
        &sock,
        &dir.path().join("vmm.log"),
    );

    case("readiness event", || {
        let ready = vm.wait_ready(LINUX_BOOT_TIMEOUT);
        assert_eq!(ready.version, env!("CARGO_PKG_VERSION"));
        assert!(ready.ready_after_ms > 0);
        let info = vm.api().info().unwrap();
        assert_eq!(info.agent.as_ref(), Some(&ready), "GET /v1/vm shows it");
        assert!(vm.log_text().contains("guest agent ready: version"));
        eprintln!(
            "agent e2e: agent ready {} ms after the VM started",
            ready.ready_after_ms
        );
    });

    case("host quirks reach the guest kernel", || {
        let emulated = vm.log_text().contains("guest ring 0 emulated");
        let out = vm.exec(&["--", "cat", "/proc/cpuinfo"]);
        assert_exit(&out, 0, "cat /proc/cpuinfo");
        let cpuinfo = text(&out).0;
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("flags"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, flags)| flags.split_whitespace().collect())
            .unwrap_or_default();
        assert!(flags.contains(&"fpu"), "no flags line in {cpuinfo}");
        if emulated {
            // Cleared by name and (clflushopt, pclmulqdq) by bit number: both forms must work.
            for cleared in ["smap", "xsave", "clflushopt", "pclmulqdq", "erms", "fsrm"] {
                assert!(!flags.contains(&cleared), "{cleared} still set: {flags:?}");
            }
        }
    });

    cli_cases(&vm, dir.path());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(client_cases(&vm));

    case("agent and VMM alive after misuse", || {
        let out = vm.exec(&["--", "echo", "still here"]);
        assert_exit(&out, 0, "exec after misuse");
        assert_eq!(text(&out).0, "still here\n");
        assert!(vm.api().info().is_ok());
    });

    restore_case(vm, dir.path());
}

fn cli_cases(vm: &Vm, dir: &Path) {
    case("exec run", || {
        let out = vm.exec(&["--", "echo", "hello", "world"]);
        assert_exit(&out, 0, "echo");
        assert_eq!(text(&out).0, "hello world\n");
    });

    case("stderr and a non-zero exit code", || {
        let out = vm.exec(&["--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
        assert_exit(&out, 7, "sh exit 7");
        let (stdout, stderr) = text(&out);
        assert_eq!(stdout, "out\n");
        assert!(stderr.contains("err\n"), "stderr: {stderr}");
    });

    case("environment, cwd and a pipe", || {
        let out = vm.exec(&[
            "--env",
            "GREETING=hi there",
            "--env",
            "OTHER=x=y",
            "--cwd",
            "/etc",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING|$OTHER|$(pwd)\"; ls | grep -c passwd",
        ]);
        assert_exit(&out, 0, "env");
        assert_eq!(text(&out).0, "hi there|x=y|/etc\n1\n");
    });

    case("10,000 lines complete and in order", || {
        let out = vm.exec(&["--", "seq", "10000"]);
        assert_exit(&out, 0, "seq");
        let expected: String = (1..=10_000).map(|i| format!("{i}\n")).collect();
        assert!(
            out.stdout == expected.as_bytes(),
            "seq output differs: {} bytes, {} lines",
            out.stdout.len(),
            text(&out).0.lines().count()
        );
    });

    case("streaming: output arrives before the process ends", || {
        let mut child = vm
            .exec_command(&["--", "sh", "-c", "echo first; sleep 4; echo second"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        lines.read_line(&mut first).unwrap();
        let first_at = Instant::now();
        assert_eq!(first, "first\n");
        let mut rest = String::new();
        lines.read_to_string(&mut rest).unwrap();
        let status = child.wait().unwrap();
        let gap = first_at.elapsed();
        assert!(status.success());
        assert_eq!(rest, "second\n");
        // The guest sleeps 4 s between the lines; streamed output shows that gap.
        assert!(
            gap >= Duration::from_secs(2),
            "first line came only {gap:?} before the end"
        );
    });

    case("stdin forwarded", || {
        let mut child = vm
            .exec_command(&["--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"piped input\nline two\n").unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"piped input\nline two\n");
    });

    case("command not found", || {
        let out = vm.exec(&["--", "no-such-command-here"]);
        assert_exit(&out, 127, "missing command");
        assert!(
            text(&out).1.contains("command not found"),
            "{}",
            text(&out).1
        );
    });

    case("cp 1 MiB both ways with matching SHA-256", || {
        let data: Vec<u8> = (0..MIB as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let local = dir.join("one-mib.bin");
        std::fs::write(&local, &data).unwrap();
        let out = vm.cli("cp", &[local.to_str().unwrap(), "vm:/tmp/"]);
        assert_exit(&out, 0, "cp up");
        let out = vm.exec(&["--", "sha256sum", "/tmp/one-mib.bin"]);
        assert_exit(&out, 0, "sha256sum");
        assert!(
            text(&out).0.starts_with(&sha256_hex(&data)),
            "{}",
            text(&out).0
        );
        let back = dir.join("back.bin");
        let out = vm.cli("cp", &["vm:/tmp/one-mib.bin", back.to_str().unwrap()]);
        assert_exit(&out, 0, "cp down");
        assert_eq!(
            sha256_hex(&std::fs::read(&back).unwrap()),
            sha256_hex(&data)
        );
    });

    case("cp errors are clear", || {
        let out = vm.cli("cp", &["vm:/no/such/file", dir.join("x").to_str().unwrap()]);
        assert_exit(&out, 1, "cp of a missing file");
        assert!(text(&out).1.contains("/no/such/file"), "{}", text(&out).1);
        let out = vm.cli("cp", &["a", "b"]);
        assert_exit(&out, 1, "cp without vm:");
    });
}

async fn client_cases(vm: &Vm) {
    let start = Instant::now();
    let (client, info) = connect_agent(&vm.sock, Duration::from_secs(30))
        .await
        .expect("agent client over the API socket");
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    let ping = client.ping().await.unwrap();
    assert!(ping.is_init, "the agent runs as PID 1");
    eprintln!(
        "agent e2e: client connected and pinged in {:.2?}",
        start.elapsed()
    );

    let start = Instant::now();
    kill_a_running_process(&client).await;
    eprintln!(
        "agent e2e: kill a running process: ok in {:.2?}",
        start.elapsed()
    );

    let start = Instant::now();
    ten_concurrent_commands(&client).await;
    eprintln!(
        "agent e2e: 10 concurrent commands: ok in {:.2?}",
        start.elapsed()
    );

    let start = Instant::now();
    files(&client).await;
    eprintln!("agent e2e: files: ok in {:.2?}", start.elapsed());

    let start = Instant::now();
    misuse(&client).await;
    eprintln!(
        "agent e2e: misuse gives gRPC errors: ok in {:.2?}",
        start.elapsed()
    );
}

async fn kill_a_running_process(client: &AgentClient) {
    let mut session = client
        .exec_stream(&ExecCommand::new("sleep").arg("600"))
        .await
        .unwrap();
    let pid = session.pid();
    assert!(pid > 1);
    // Signal 0 probes (kill(2)); SIGKILL kills.
    client.kill(pid, 0, false).await.unwrap();
    client.kill(pid, libc::SIGKILL, false).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match session.next_event().await.unwrap() {
                Some(ExecEvent::Exit { status, .. }) => return status,
                Some(_) => {}
                None => panic!("no exit event"),
            }
        }
    })
    .await
    .expect("killed process did not exit");
    assert_eq!(exit, ExitOutcome::Signal(libc::SIGKILL));
}

async fn ten_concurrent_commands(client: &AgentClient) {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..10u32 {
        let client = client.clone();
        set.spawn(async move {
            let out = client
                .exec(&ExecCommand::new("echo").arg(format!("job-{i}")))
                .await
                .unwrap();
            (i, out)
        });
    }
    let mut seen = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (i, out) = joined.unwrap();
        assert!(out.success(), "job {i}: {:?}", out.status);
        assert_eq!(out.stdout, format!("job-{i}\n").as_bytes());
        seen.push(i);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
}

async fn files(client: &AgentClient) {
    let parents = WriteOptions {
        mode: 0o640,
        create_parents: true,
        append: false,
    };
    // Nested directories, created by the write.
    let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    let deep = "/tmp/tree/a/b/c/data.bin";
    assert_eq!(
        client.write_file(deep, &data, parents).await.unwrap(),
        MIB as u64
    );
    let back = client.read_file(deep).await.unwrap();
    assert_eq!(sha256_hex(&back), sha256_hex(&data));
    let info = client.stat(deep).await.unwrap();
    assert_eq!((info.size, info.mode), (MIB as u64, 0o640));

    // Special characters in names.
    let odd = "/tmp/tree/sp ace & ünï'cødé $x \"q\" #1.txt";
    client.write_file(odd, b"odd", parents).await.unwrap();
    assert_eq!(client.read_file(odd).await.unwrap(), b"odd");

    // Listing.
    client.mkdir("/tmp/tree/empty", false).await.unwrap();
    let names: Vec<String> = client
        .list_dir("/tmp/tree")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(
        names,
        ["a", "empty", "sp ace & ünï'cødé $x \"q\" #1.txt"],
        "sorted listing"
    );
    client.rename(odd, "/tmp/tree/renamed.txt").await.unwrap();
    assert!(!client.exists(odd).await.unwrap());
    assert!(client.exists("/tmp/tree/renamed.txt").await.unwrap());

    // Delete: a non-empty directory needs `recursive`.
    let err = client.remove("/tmp/tree", false).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    client.remove("/tmp/tree", true).await.unwrap();
    assert!(!client.exists("/tmp/tree").await.unwrap());
}

async fn misuse(client: &AgentClient) {
    let err = client
        .exec(&ExecCommand::new("/no/such/program"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");

    let err = client.read_file("/no/such/file").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    let err = client.read_file("relative/path").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let err = client.list_dir("/etc/passwd").await.unwrap_err();
    assert!(err.code().is_some(), "{err}");

    // Permission denied even for root: exec of a file without any execute bit.
    let plain = WriteOptions {
        mode: 0o644,
        ..WriteOptions::default()
    };
    client
        .write_file("/tmp/not-executable", b"#!/bin/sh\necho hi\n", plain)
        .await
        .unwrap();
    let err = client
        .exec(&ExecCommand::new("/tmp/not-executable"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");

    // Writing under a read-only file system (sysfs).
    let err = client
        .write_file("/sys/dormouse-test", b"x", plain)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            Some(Code::PermissionDenied | Code::FailedPrecondition | Code::NotFound)
        ),
        "{err}"
    );

    // Oversized: a 64 KiB path (the kernel's limit is 4 KiB). The 16 MiB payload limit is
    // tested against a host-run agent (agent/guest/tests): pushing 17 MiB into an emulated guest
    // takes minutes.
    let long_path = format!("/tmp/{}", "x".repeat(64 * 1024));
    let err = client.read_file(&long_path).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Some(Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange)
        ),
        "{err}"
    );

    // Still alive.
    if let Err(e) = client.ping().await {
        panic!("the agent stopped answering after the oversized request: {e:?}");
    }
}

fn restore_case(vm: Vm, dir: &Path) {
    let snapshot = dir.join("snap");
    case(
        "snapshot -> restore: the agent announces itself again; `reboot` ends the VM",
        || {
            let out = Command::new(dormouse_bin())
                .args(["ctl", "--sock"])
                .arg(&vm.sock)
                .args(["snapshot", "--dir"])
                .arg(&snapshot)
                .output()
                .unwrap();
            assert!(out.status.success(), "snapshot: {}", text(&out).1);
            drop(vm);

            let sock = dir.join("restored.sock");
            let console = dir.join("restored-console.log");
            let mut restored = Vm::spawn(
                &[
                    "restore",
                    "--dir",
                    snapshot.to_str().unwrap(),
                    "--console",
                    console.to_str().unwrap(),
                ],
                &sock,
                &dir.join("restored-vmm.log"),
            );
            let woke = Instant::now();
            let ready = restored.wait_ready(Duration::from_secs(120));
            eprintln!(
                "agent e2e: restored VM: agent re-announced {} ms after the restore ({:.2?} here)",
                ready.ready_after_ms,
                woke.elapsed()
            );
            let out = restored.exec(&["--", "echo", "awake"]);
            assert_exit(&out, 0, "exec after restore");
            assert_eq!(text(&out).0, "awake\n");

            // Busybox's `reboot` signals PID 1 (the agent), which reboots the machine: the VM
            // ends and dormouse exits 0.
            let _ = restored.exec(&["--", "reboot"]);
            let deadline = Instant::now() + Duration::from_secs(120);
            let status = loop {
                if let Some(status) = restored.child.try_wait().unwrap() {
                    break status;
                }
                assert!(
                    Instant::now() < deadline,
                    "the VM did not end after `reboot`:\n{}",
                    restored.log_text()
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            assert_eq!(status.code(), Some(0), "{}", restored.log_text());
        },
    );
}
