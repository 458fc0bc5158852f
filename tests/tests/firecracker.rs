//! `dormouse firecracker`: Firecracker's command line and API driving the tiny guest through
//! configure → InstanceStart → pause → snapshot/create, then a second process
//! snapshot/load → running (docs/firecracker.md); the same flow from a PyPI Firecracker client;
//! and a Linux guest whose agent answers through the hybrid vsock socket before and after.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::*;
use vmm::tiny_guest::{self, TinyGuestEnd, TINY_GUEST_MESSAGE};
use vmm_api::http::parse_response;

/// One request on a fresh connection (the server closes after each answer): status and body.
fn call(sock: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut stream = UnixStream::connect(sock).expect("connect to the API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let parsed = parse_response(&answer).expect("an HTTP response");
    let json = if parsed.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&parsed.body).expect("a JSON body")
    };
    (parsed.status, json)
}

/// `GET /metrics` (dormouse's Prometheus text) on the socket: the raw head and the body.
fn prometheus_text(sock: &Path) -> (String, String) {
    let mut stream = UnixStream::connect(sock).expect("connect to the API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    (head.to_string(), body.to_string())
}

/// The value of the sample `name` whose labels include every one of `labels` (`k="v"`).
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        (metric == name && labels.iter().all(|l| rest.contains(l))).then(|| value.parse().unwrap())
    })
}

/// The last line of a metrics file, parsed.
fn last_metrics_line(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text.lines().last().expect("a metrics line");
    serde_json::from_str(line).expect("a JSON metrics line")
}

fn ok(sock: &Path, method: &str, path: &str, body: Value) {
    let (status, answer) = call(sock, method, path, Some(body));
    assert_eq!(status, 204, "{method} {path}: {answer}");
}

fn state(sock: &Path) -> String {
    let (status, info) = call(sock, "GET", "/", None);
    assert_eq!(status, 200, "GET /: {info}");
    info["state"].as_str().unwrap().to_string()
}

fn wait_for_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "no API socket at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn firecracker(sock: &Path) -> Running {
    firecracker_with(sock, &[])
}

fn firecracker_with(sock: &Path, extra: &[&std::ffi::OsStr]) -> Running {
    firecracker_in(None, sock, extra)
}

/// `dormouse firecracker`, inside `ns` when given (where its TAPs are).
fn firecracker_in(ns: Option<&NetNs>, sock: &Path, extra: &[&std::ffi::OsStr]) -> Running {
    let mut cmd = match ns {
        Some(ns) => ns.command(&dormouse_bin()),
        None => Command::new(dormouse_bin()),
    };
    cmd.args(["firecracker", "--id", "fc-e2e", "--api-sock"])
        .arg(sock)
        .args(extra);
    let running = Running::spawn(cmd);
    wait_for_socket(sock);
    running
}

#[test]
fn configure_start_pause_snapshot_and_load_in_a_new_process() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny-idle.elf");
    tiny_guest::write_portable_to(&kernel, TinyGuestEnd::Idle).unwrap();
    let sock = dir.path().join("fc.sock");
    let first = firecracker(&sock);
    assert_eq!(state(&sock), "Not started");
    let (status, version) = call(&sock, "GET", "/version", None);
    assert_eq!(status, 200);
    assert!(version["firecracker_version"]
        .as_str()
        .unwrap()
        .starts_with("1."));

    // A start that fails is a 400 with the reason, and the VMM stays pre-boot for a retry.
    let missing = dir.path().join("missing.elf");
    let body = json!({"kernel_image_path": missing});
    let (status, fault) = call(&sock, "PUT", "/boot-source", Some(body));
    assert_eq!(
        status, 400,
        "a missing kernel is refused at the PUT: {fault}"
    );
    let not_a_kernel = dir.path().join("not-a-kernel.elf");
    std::fs::write(&not_a_kernel, b"not an ELF").unwrap();
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": not_a_kernel}),
    );
    let start = json!({"action_type": "InstanceStart"});
    let (status, fault) = call(&sock, "PUT", "/actions", Some(start));
    assert_eq!(status, 400, "{fault}");
    let message = fault["fault_message"].as_str().unwrap();
    assert!(message.starts_with("Start microvm error:"), "{fault}");
    assert_eq!(state(&sock), "Not started");
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
    );
    ok(
        &sock,
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    // Refused with a reason, and nothing changed.
    let (status, fault) = call(
        &sock,
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 2, "mem_size_mib": 32, "smt": true})),
    );
    assert_eq!(status, 400);
    assert!(
        fault["fault_message"]
            .as_str()
            .unwrap()
            .contains("not supported by dormouse"),
        "{fault}"
    );
    let (status, fault) = call(&sock, "PATCH", "/vm", Some(json!({"state": "Paused"})));
    assert_eq!(
        (status, fault["fault_message"].as_str().unwrap()),
        (
            400,
            "The requested operation is not supported before starting the microVM."
        )
    );
    let flush = json!({"action_type": "FlushMetrics"});
    let (status, fault) = call(&sock, "PUT", "/actions", Some(flush.clone()));
    assert_eq!(status, 400, "FlushMetrics before boot: {fault}");
    let metrics_file = dir.path().join("metrics.json");
    ok(
        &sock,
        "PUT",
        "/metrics",
        json!({"metrics_path": metrics_file}),
    );
    // PUT /logger moves the log to a file with level prefixes; a bad module is refused.
    let log_file = dir.path().join("fc.log");
    let (status, fault) = call(
        &sock,
        "PUT",
        "/logger",
        Some(json!({"level": "Info", "module": "vmm,devices=trace"})),
    );
    assert_eq!(status, 400, "{fault}");
    ok(
        &sock,
        "PUT",
        "/logger",
        json!({"log_path": log_file, "level": "info", "show_level": true}),
    );

    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    first.wait_for(
        std::str::from_utf8(TINY_GUEST_MESSAGE).unwrap().trim(),
        Duration::from_secs(20),
    );
    assert_eq!(state(&sock), "Running");
    let logged = std::fs::read_to_string(&log_file).unwrap();
    assert!(
        logged.contains("INFO") && logged.contains("host:"),
        "the VM's build went to the new log: {logged}"
    );
    let (status, fault) = call(&sock, "PUT", "/logger", Some(json!({"level": "Debug"})));
    assert_eq!(
        (status, fault["fault_message"].as_str().unwrap()),
        (
            400,
            "The requested operation is not supported after starting the microVM."
        )
    );
    // FlushMetrics appends a line: Firecracker's groups, the guest's port I/O (its console
    // output) among the vCPU exits, the API requests so far.
    ok(&sock, "PUT", "/actions", flush.clone());
    let line = last_metrics_line(&metrics_file);
    for group in [
        "utc_timestamp_ms",
        "vcpu",
        "api_server",
        "latencies_us",
        "snapshot",
    ] {
        assert!(line.get(group).is_some(), "no {group}: {line}");
    }
    assert!(line["vcpu"]["exit_io_out"].as_u64().unwrap() > 0, "{line}");
    assert!(
        line["api_server"]["requests_count"].as_u64().unwrap() > 5,
        "{line}"
    );
    assert!(
        line["api_server"]["requests_fails"].as_u64().unwrap() >= 4,
        "{line}"
    );
    // The same counters, cumulative, on dormouse's Prometheus endpoint.
    let (_, text) = prometheus_text(&sock);
    let out = sample(
        &text,
        "dormouse_vcpu_exits_total",
        &["kind=\"io_out\"", "vm_id=\"fc-e2e\""],
    );
    assert!(out.unwrap_or(0.0) > 0.0, "{text}");
    let (status, info) = call(&sock, "GET", "/", None);
    assert_eq!((status, info["id"].as_str().unwrap()), (200, "fc-e2e"));
    // dormouse's own API on the same socket sees the same VM.
    let (status, own) = call(&sock, "GET", "/v1/vm", None);
    assert_eq!((status, own["mem_mib"].as_u64()), (200, Some(32)), "{own}");
    // Firecracker refuses configuration after boot, and a snapshot of a running VM.
    let (status, fault) = call(
        &sock,
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": kernel})),
    );
    assert_eq!(
        (status, fault["fault_message"].as_str().unwrap()),
        (
            400,
            "The requested operation is not supported after starting the microVM."
        )
    );
    let snapshot_path = dir.path().join("vm.snap");
    let mem_file_path = dir.path().join("vm.mem");
    let create = json!({"snapshot_type": "Full", "snapshot_path": snapshot_path, "mem_file_path": mem_file_path});
    let (status, fault) = call(&sock, "PUT", "/snapshot/create", Some(create.clone()));
    assert_eq!(status, 400, "{fault}");

    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    assert_eq!(state(&sock), "Paused");
    ok(&sock, "PUT", "/snapshot/create", create);
    ok(&sock, "PUT", "/actions", flush.clone());
    let line = last_metrics_line(&metrics_file);
    assert_eq!(line["snapshot"]["full_create_count"], 1, "{line}");
    assert!(
        line["latencies_us"]["full_create_snapshot"]
            .as_u64()
            .unwrap()
            > 0,
        "{line}"
    );
    // Deltas: only the requests since the previous flush (that FlushMetrics, GET /metrics,
    // GET /, GET /v1/vm, the refused boot-source and snapshot, pause, GET /, the snapshot);
    // the line is written before its own request is counted.
    assert_eq!(line["api_server"]["requests_count"], 9, "{line}");
    assert_eq!(line["api_server"]["requests_fails"], 2, "{line}");
    assert!(snapshot_path.join("state.bin").is_file());
    assert!(snapshot_path.join("firecracker.json").is_file());
    assert_eq!(
        std::fs::metadata(&mem_file_path).unwrap().len(),
        32 << 20,
        "the memory file is the snapshot's memory.bin under a second name"
    );
    first.kill();

    let sock2 = dir.path().join("fc2.sock");
    // The second process writes its metrics to a named pipe given on the command line.
    let fifo = dir.path().join("metrics.fifo");
    let fifo_c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o600) }, 0);
    let second = firecracker_with(&sock2, &["--metrics-path".as_ref(), fifo.as_os_str()]);
    let started = Instant::now();
    ok(
        &sock2,
        "PUT",
        "/snapshot/load",
        json!({
            "snapshot_path": snapshot_path,
            "mem_backend": {"backend_type": "File", "backend_path": mem_file_path},
            "track_dirty_pages": true,
            "resume_vm": true
        }),
    );
    eprintln!("snapshot/load answered in {:?}", started.elapsed());
    assert_eq!(state(&sock2), "Running");
    let (status, machine) = call(&sock2, "GET", "/machine-config", None);
    assert_eq!(
        (status, machine["mem_size_mib"].as_u64()),
        (200, Some(32)),
        "{machine}"
    );
    let (status, own) = call(&sock2, "GET", "/v1/vm", None);
    assert_eq!(
        (status, own["state"].as_str()),
        (200, Some("running")),
        "{own}"
    );
    // A second load into the same process is refused: its VM already runs.
    let (status, fault) = call(
        &sock2,
        "PUT",
        "/snapshot/load",
        Some(json!({"snapshot_path": snapshot_path, "mem_file_path": mem_file_path})),
    );
    assert_eq!(
        (status, fault["fault_message"].as_str().unwrap()),
        (
            400,
            "The requested operation is not supported after starting the microVM."
        )
    );
    // Still running a moment later (a restored VM that failed would have ended the process).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(state(&sock2), "Running");
    ok(&sock2, "PATCH", "/vm", json!({"state": "Paused"}));
    ok(&sock2, "PATCH", "/vm", json!({"state": "Resumed"}));
    assert_eq!(state(&sock2), "Running");
    // The VMM holds the pipe open for reading too, so opening its read end does not block.
    let reader = std::fs::File::open(&fifo).unwrap();
    ok(&sock2, "PUT", "/actions", flush);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(reader), &mut line).unwrap();
    let line: Value = serde_json::from_str(&line).expect("a JSON line from the pipe");
    assert_eq!(line["snapshot"]["load_count"], 1, "{line}");
    assert!(
        line["latencies_us"]["load_snapshot"].as_u64().unwrap() > 0,
        "{line}"
    );
    drop(second);
}

#[test]
fn started_as_firecracker_with_a_config_file_and_no_api() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny-idle.elf");
    tiny_guest::write_portable_to(&kernel, TinyGuestEnd::Idle).unwrap();
    let link: PathBuf = dir.path().join("firecracker");
    std::os::unix::fs::symlink(dormouse_bin(), &link).unwrap();

    let version = Command::new(&link).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("Firecracker v1."));
    for (flag, needle) in [
        (vec!["--no-api"], "--config-file"),
        (
            vec!["--seccomp-filter", "/f.bpf"],
            "installs its own filter on every thread",
        ),
        (
            vec!["--metrics-path", "/nonexistent-dir/metrics"],
            "Cannot open the metrics file",
        ),
    ] {
        let out = Command::new(&link).args(&flag).output().unwrap();
        assert!(!out.status.success(), "{flag:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{flag:?}: {err}");
    }

    let config = dir.path().join("vm.json");
    std::fs::write(
        &config,
        json!({
            "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0", "initrd_path": null},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 16, "smt": false},
            "drives": [],
            "balloon": null
        })
        .to_string(),
    )
    .unwrap();
    // With dormouse's filters (the default; the start runs on a filtered thread) and without.
    for seccomp in [None, Some("--no-seccomp")] {
        let log = dir.path().join(format!("fc-{}.log", seccomp.is_some()));
        let mut cmd = Command::new(&link);
        cmd.args(["--no-api", "--level", "Debug", "--show-level"])
            .args(seccomp)
            .arg("--config-file")
            .arg(&config)
            .arg("--log-path")
            .arg(&log)
            .stderr(Stdio::null());
        let running = Running::spawn(cmd);
        running.wait_for(
            std::str::from_utf8(TINY_GUEST_MESSAGE).unwrap().trim(),
            Duration::from_secs(20),
        );
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(
            logged.contains("INFO") && logged.contains("host:"),
            "{seccomp:?}: {logged}"
        );
    }
}

/// The virtualenv's python with the PyPI client, or None (skip) when it cannot be installed
/// outside CI.
fn python_client() -> Option<PathBuf> {
    let out = Command::new(repo_root().join("deploy/install-fc-python-client.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running deploy/install-fc-python-client.sh");
    if !out.status.success() {
        assert!(
            std::env::var_os("CI").is_none(),
            "deploy/install-fc-python-client.sh failed"
        );
        eprintln!("skipped: the PyPI Firecracker client could not be installed");
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(PathBuf::from(text.lines().last()?.trim()))
}

fn python_phase(python: &Path, args: &[&std::ffi::OsStr]) {
    let out = Command::new(python)
        .arg(repo_root().join("tests/fc-python/flow.py"))
        .args(args)
        .output()
        .expect("running tests/fc-python/flow.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "flow.py {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_firecracker_client_from_pypi_drives_the_same_flow() {
    if !require_kvm() {
        return;
    }
    let Some(python) = python_client() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny-idle.elf");
    tiny_guest::write_portable_to(&kernel, TinyGuestEnd::Idle).unwrap();
    let snapshot_path = dir.path().join("py.snap");
    let mem_file_path = dir.path().join("py.mem");
    // The client puts the socket path in the URL's host, which urllib3 lowercases: a tempdir
    // name with capitals would not be found (against Firecracker too). run_dir() has none.
    let sock = run_dir().join("fc-python.sock");
    let first = firecracker(&sock);
    python_phase(
        &python,
        &[
            "boot".as_ref(),
            sock.as_os_str(),
            kernel.as_os_str(),
            snapshot_path.as_os_str(),
            mem_file_path.as_os_str(),
        ],
    );
    first.wait_for(
        std::str::from_utf8(TINY_GUEST_MESSAGE).unwrap().trim(),
        Duration::from_secs(20),
    );
    first.kill();
    let sock2 = run_dir().join("fc-python-2.sock");
    let second = firecracker(&sock2);
    python_phase(
        &python,
        &[
            "load".as_ref(),
            sock2.as_os_str(),
            snapshot_path.as_os_str(),
            mem_file_path.as_os_str(),
        ],
    );
    assert_eq!(state(&sock2), "Running");
    drop(second);
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

/// Waits for the guest agent's announcement through dormouse's own route on the same socket.
fn wait_agent(sock: &Path) {
    let (status, ready) = call(
        sock,
        "PUT",
        "/v1/agent/wait",
        Some(json!({"timeout_ms": LINUX_BOOT_TIMEOUT.as_millis() as u64})),
    );
    assert_eq!(status, 200, "agent not ready: {ready}");
}

/// Runs `command` in the guest through the hybrid vsock socket (Firecracker's `CONNECT
/// 1024`); its stdout.
fn exec_over_hybrid_vsock(uds: &Path, command: agent_client::ExecCommand) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let output = runtime.block_on(async {
        let client = agent_client::AgentClient::connect_hybrid_vsock(uds, 1024)
            .await
            .expect("agent over the hybrid vsock socket");
        client.exec(&command).await.expect("exec")
    });
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `echo WORD` in the guest through the hybrid vsock socket.
fn echo_over_hybrid_vsock(uds: &Path, word: &str) {
    let stdout = exec_over_hybrid_vsock(uds, agent_client::ExecCommand::new("echo").arg(word));
    assert_eq!(stdout, format!("{word}\n"));
}

/// A raw disk image of `sectors` sectors of zeros with `marker` at sector `at`.
fn raw_image(path: &Path, sectors: u64, at: u64, marker: &[u8]) {
    let mut bytes = vec![0u8; (sectors * 512) as usize];
    let start = (at * 512) as usize;
    bytes[start..start + marker.len()].copy_from_slice(marker);
    std::fs::write(path, bytes).unwrap();
}

/// `sh -c SCRIPT` in the guest through the hybrid vsock socket: its stdout.
fn guest_sh(uds: &Path, script: &str) -> String {
    exec_over_hybrid_vsock(
        uds,
        agent_client::ExecCommand::new("sh").arg("-c").arg(script),
    )
}

/// The guest's side of the MMDS (V2): a token from a raw PUT, the metadata with it (a key from
/// the PUT before boot, one from the PATCH after), and a GET without it. Few processes: each
/// costs about half a second here.
const GUEST_MMDS_SCRIPT: &str = r#"m=169.254.169.254
t=$(printf 'PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n' | nc $m 80 | tail -n 1)
printf "GET /latest/meta-data/ HTTP/1.1\r\nX-metadata-token: $t\r\n\r\n" | nc $m 80
echo
printf "GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: $t\r\n\r\n" | nc $m 80
echo
printf 'GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n' | nc $m 80
"#;

#[test]
fn a_linux_guest_answers_over_hybrid_vsock_before_and_after_a_load() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = agent_rootfs(dir.path());
    // With root, the guest also has a network interface (a TAP in a namespace) serving the MMDS.
    let ns = require_root().then(|| {
        let ns = NetNs::new("fcmmds");
        ns.exec(&[
            "ip", "tuntap", "add", "dev", "dmfc0", "mode", "tap", "vnet_hdr",
        ]);
        ns.exec(&["ip", "link", "set", "dmfc0", "up"]);
        ns
    });
    let _serial = linux_boot_lock();
    let sock = dir.path().join("fc.sock");
    let uds = dir.path().join("v.sock");
    let first = firecracker_in(ns.as_ref(), &sock, &[]);
    // eth0 from the agent (dormouse.ip=): a link-local address, the MMDS on-link.
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": vmlinux(),
               "boot_args": "console=ttyS0 reboot=k panic=-1 dormouse.ip=169.254.0.2/16"}),
    );
    if ns.is_some() {
        ok(
            &sock,
            "PUT",
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "dmfc0", "guest_mac": "06:00:a9:fe:00:02"}),
        );
        ok(
            &sock,
            "PUT",
            "/mmds/config",
            json!({"version": "V2", "network_interfaces": ["eth0"]}),
        );
        ok(
            &sock,
            "PUT",
            "/mmds",
            json!({"latest": {"meta-data": {"ami-id": "ami-dormouse"}}}),
        );
    }
    ok(
        &sock,
        "PUT",
        "/drives/rootfs",
        json!({"drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true, "is_read_only": false}),
    );
    // A second disk (the guest's vdb): 1 MiB now, swapped for a 2 MiB file once running.
    let data_old = dir.path().join("data-old.img");
    let data_new = dir.path().join("data-new.img");
    raw_image(&data_old, 2048, 0, b"old");
    raw_image(&data_new, 4096, 3000, b"dormouse-swapped");
    ok(
        &sock,
        "PUT",
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": data_old, "is_root_device": false, "is_read_only": true}),
    );
    ok(
        &sock,
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 256}),
    );
    ok(
        &sock,
        "PUT",
        "/vsock",
        json!({"guest_cid": 3, "uds_path": uds}),
    );
    let booted = Instant::now();
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    wait_agent(&sock);
    eprintln!(
        "firecracker e2e: agent ready {:.2?} after InstanceStart",
        booted.elapsed()
    );
    echo_over_hybrid_vsock(&uds, "before");

    // PATCH /drives with a new path_on_host on the running VM: errors first, then the swap.
    let (status, body) = call(
        &sock,
        "PATCH",
        "/drives/nope",
        Some(json!({"drive_id": "nope", "path_on_host": data_new})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["fault_message"]
            .as_str()
            .unwrap()
            .contains("Device not found"),
        "{body}"
    );
    let (status, body) = call(
        &sock,
        "PATCH",
        "/drives/data",
        Some(json!({"drive_id": "data", "path_on_host": dir.path().join("missing.img")})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["fault_message"]
            .as_str()
            .unwrap()
            .contains("missing.img"),
        "{body}"
    );
    ok(
        &sock,
        "PATCH",
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": data_new}),
    );
    // The guest learns the new size from a config-change interrupt (a work item: wait for it),
    // then reads sector 3000, past the old file's end, so no cached page can answer it.
    let swapped = exec_over_hybrid_vsock(
        &uds,
        agent_client::ExecCommand::new("sh").arg("-c").arg(
            "for i in $(seq 50); do [ $(cat /sys/block/vdb/size) = 4096 ] && break; sleep 0.1; done; \
             cat /sys/block/vdb/size; dd if=/dev/vdb bs=512 skip=3000 count=1 2>/dev/null | head -c 16",
        ),
    );
    assert_eq!(swapped, "4096\ndormouse-swapped", "vdb after the swap");
    let (_, config) = call(&sock, "GET", "/vm/config", None);
    assert_eq!(
        config["drives"][1]["path_on_host"],
        json!(data_new),
        "{config}"
    );
    if ns.is_some() {
        ok(
            &sock,
            "PATCH",
            "/mmds",
            json!({"latest": {"meta-data": {"patched": "after-boot"}}}),
        );
        let mmds_started = Instant::now();
        let out = guest_sh(&uds, GUEST_MMDS_SCRIPT);
        eprintln!(
            "firecracker e2e: the guest's MMDS exchanges took {:.2?}",
            mmds_started.elapsed()
        );
        let answers: Vec<&str> = out.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(answers.len(), 3, "three answers: {out:?}");
        assert!(answers[0].starts_with("200"), "{out:?}");
        assert!(
            answers[0].ends_with("\r\n\r\nami-id\npatched\n"),
            "the PUT's key and the PATCH's: {out:?}"
        );
        assert!(answers[1].starts_with("200"), "{out:?}");
        assert!(answers[1].ends_with("\r\n\r\nami-dormouse\n"), "{out:?}");
        assert!(
            answers[2].starts_with("401"),
            "no token, no metadata: {out:?}"
        );
    }
    // The boot read the root disk; the agent talked over vsock: both counted, by device.
    let (_, text) = prometheus_text(&sock);
    let read = sample(
        &text,
        "dormouse_block_read_bytes_total",
        &["device=\"rootfs\"", "vm_id=\"fc-e2e\""],
    );
    assert!(read.unwrap_or(0.0) > 0.0, "{text}");
    let vsock_rx = sample(
        &text,
        "dormouse_vsock_rx_bytes_total",
        &["device=\"vsock\""],
    );
    assert!(vsock_rx.unwrap_or(0.0) > 0.0, "{text}");
    let conns = sample(
        &text,
        "dormouse_vsock_connections_added_total",
        &["device=\"vsock\""],
    );
    assert!(
        conns.unwrap_or(0.0) >= 2.0,
        "agent READY and the exec: {text}"
    );

    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    let snapshot_path = dir.path().join("linux.snap");
    let mem_file_path = dir.path().join("linux.mem");
    ok(
        &sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": snapshot_path, "mem_file_path": mem_file_path}),
    );
    drop(first);

    // The clone gets its own hybrid socket (Firecracker's vsock_override).
    let sock2 = dir.path().join("fc2.sock");
    let uds2 = dir.path().join("v2.sock");
    let second = firecracker_in(ns.as_ref(), &sock2, &[]);
    let loaded = Instant::now();
    ok(
        &sock2,
        "PUT",
        "/snapshot/load",
        json!({
            "snapshot_path": snapshot_path,
            "mem_file_path": mem_file_path,
            "vsock_override": {"uds_path": uds2},
            "resume_vm": true
        }),
    );
    wait_agent(&sock2);
    eprintln!(
        "firecracker e2e: agent re-announced {:.2?} after snapshot/load",
        loaded.elapsed()
    );
    echo_over_hybrid_vsock(&uds2, "after");
    if ns.is_some() {
        // The snapshot kept the MMDS configuration (V2 on eth0), not its document: without a
        // token the guest is refused (V1 would have answered, with a 404 on the empty store).
        let out = guest_sh(
            &uds2,
            "printf 'GET /latest HTTP/1.1\\r\\n\\r\\n' | nc 169.254.169.254 80",
        );
        assert!(out.starts_with("HTTP/1.1 401 "), "{out:?}");
        assert_eq!(
            call(&sock2, "GET", "/mmds", None),
            (200, json!({})),
            "the document is not in the snapshot"
        );
    }
    assert_eq!(state(&sock2), "Running");

    // Ctrl+Alt+Del: the guest kernel (i8042 + atkbd, C_A_D on) restarts through the i8042
    // reset line, and the process exits with 0, as Firecracker's on a guest reset.
    let mut second = second;
    let pressed = Instant::now();
    ok(
        &sock2,
        "PUT",
        "/actions",
        json!({"action_type": "SendCtrlAltDel"}),
    );
    let status = loop {
        if let Some(status) = second.try_wait() {
            break status;
        }
        assert!(
            pressed.elapsed() < Duration::from_secs(20),
            "still running 20 s after SendCtrlAltDel; console:\n{}",
            second.console_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "firecracker e2e: exited {status} {:.2?} after SendCtrlAltDel",
        pressed.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{}", second.console_tail());
}

#[test]
fn metadata_and_mmds_size_limit_flags_seed_and_bound_the_mmds() {
    let dir = tempfile::tempdir().unwrap();
    let metadata = dir.path().join("metadata.json");
    std::fs::write(
        &metadata,
        r#"{"latest": {"meta-data": {"ami-id": "ami-flag"}}}"#,
    )
    .unwrap();
    let sock = dir.path().join("fc.sock");
    let _vmm = firecracker_with(
        &sock,
        &[
            "--metadata".as_ref(),
            metadata.as_os_str(),
            "--mmds-size-limit".as_ref(),
            "100".as_ref(),
        ],
    );
    assert_eq!(
        call(&sock, "GET", "/mmds", None),
        (
            200,
            json!({"latest": {"meta-data": {"ami-id": "ami-flag"}}})
        )
    );
    let (status, fault) = call(
        &sock,
        "PATCH",
        "/mmds",
        Some(json!({"big": "x".repeat(100)})),
    );
    assert_eq!(status, 400, "{fault}");
    assert_eq!(
        fault["fault_message"],
        "The MMDS patch request doesn't fit."
    );
}
