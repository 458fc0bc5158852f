//! The server over a real socket, with a mock VM.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::client::{ApiClient, ClientError};
use super::http::{parse_response, ParsedResponse};
use super::*;

#[derive(Default)]
struct MockVm {
    paused: Mutex<bool>,
    shutdown_requested: AtomicBool,
    snapshots: AtomicU32,
    /// `replace` of every snapshot request that reached the VM, in order.
    replace_flags: Mutex<Vec<bool>>,
    /// Every limiter update that reached the VM: (drive or net, index, body as JSON).
    limit_updates: Mutex<Vec<(&'static str, usize, String)>>,
    metrics: std::sync::OnceLock<vmm_metrics::VmMetrics>,
}

impl VmControl for MockVm {
    fn metrics(&self) -> Option<vmm_metrics::VmMetrics> {
        Some(
            self.metrics
                .get_or_init(|| vmm_metrics::VmMetrics::new("mock").unwrap())
                .clone(),
        )
    }

    fn pause(&self) -> Result<(), ApiError> {
        let mut paused = self.paused.lock().unwrap();
        if *paused {
            return Err(ApiError::wrong_state("the VM is already paused"));
        }
        *paused = true;
        Ok(())
    }

    fn resume(&self) -> Result<(), ApiError> {
        let mut paused = self.paused.lock().unwrap();
        if !*paused {
            return Err(ApiError::wrong_state("the VM is not paused"));
        }
        *paused = false;
        Ok(())
    }

    fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotInfo, ApiError> {
        if req.dir == Path::new("/fail") {
            return Err(ApiError::internal("disk full"));
        }
        if req.dir == Path::new("/panic") {
            panic!("mock VM panics on purpose");
        }
        self.replace_flags.lock().unwrap().push(req.replace);
        let n = self.snapshots.fetch_add(1, Ordering::SeqCst);
        Ok(SnapshotInfo {
            dir: req.dir,
            diff: req.diff,
            snapshot_id: format!("snap-{n}"),
            parent_id: req.diff.then(|| format!("snap-{}", n.wrapping_sub(1))),
            pages_written: 42,
            memory: "written".into(),
            duration_ms: 7,
            paused_us: if req.live { 900 } else { 7000 },
            live: req.live,
            live_unavailable: None,
        })
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        self.shutdown_requested.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn info(&self) -> Result<VmInfo, ApiError> {
        let paused = *self.paused.lock().unwrap();
        Ok(VmInfo {
            state: if paused {
                VmState::Paused
            } else {
                VmState::Running
            },
            vcpus: 2,
            mem_mib: 256,
            host: "kvm-pvm".into(),
            cmdline: "console=ttyS0".into(),
            devices: vec![DeviceInfo {
                kind: "virtio-blk".into(),
                id: Some("rootfs".into()),
                mmio_base: Some(0xd000_0000),
                irq: Some(5),
            }],
            agent: None,
            balloon: None,
            uptime_ms: 1234,
        })
    }

    /// One disk (index 0); answers what it was asked to set.
    fn update_drive(&self, index: usize, update: DriveUpdate) -> Result<DriveUpdate, ApiError> {
        if index != 0 {
            return Err(ApiError::invalid_request(format!(
                "the VM has no disk {index}"
            )));
        }
        let json = serde_json::to_string(&update).unwrap();
        self.limit_updates
            .lock()
            .unwrap()
            .push(("drive", index, json));
        Ok(update)
    }

    fn update_net(&self, index: usize, update: NetUpdate) -> Result<NetUpdate, ApiError> {
        let json = serde_json::to_string(&update).unwrap();
        self.limit_updates
            .lock()
            .unwrap()
            .push(("net", index, json));
        Ok(update)
    }

    fn wait_agent(&self, timeout: Duration) -> Result<AgentInfo, ApiError> {
        if timeout < Duration::from_millis(100) {
            return Err(ApiError::Timeout("no agent yet".into()));
        }
        Ok(AgentInfo {
            version: "mock".into(),
            ready_after_ms: 5,
        })
    }

    /// Port 1024 is an echo server in the "guest"; every other port refuses.
    fn vsock_connect(
        &self,
        stream: UnixStream,
        port: u32,
        on_answer: VsockAnswer,
    ) -> Result<(), ApiError> {
        if port != 1024 {
            on_answer(Err(std::io::ErrorKind::ConnectionRefused.into()));
            return Ok(());
        }
        std::thread::spawn(move || {
            on_answer(Ok(1_073_741_824));
            let mut buf = [0u8; 64];
            let mut stream = stream;
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        Ok(())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    vm: Arc<MockVm>,
    server: ApiServer,
}

const TEST_TIMEOUT: Duration = Duration::from_millis(400);

fn fixture_with(config: ApiServerConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let vm = Arc::new(MockVm::default());
    let server = ApiServer::start_with(&path, vm.clone(), config).unwrap();
    Fixture {
        _dir: dir,
        path,
        vm,
        server,
    }
}

fn fixture() -> Fixture {
    fixture_with(ApiServerConfig {
        request_timeout: TEST_TIMEOUT,
        ..ApiServerConfig::default()
    })
}

/// Sends raw bytes, half-closes, and returns the raw answer (empty if the server just closed).
fn exchange(path: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // The server may answer and close before reading everything (e.g. oversized heads).
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

fn send(path: &Path, bytes: &[u8]) -> ParsedResponse {
    let answer = exchange(path, bytes);
    parse_response(&answer)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&answer)))
}

fn request(path: &Path, method: &str, target: &str, body: &str) -> ParsedResponse {
    let raw = format!(
        "{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    send(path, raw.as_bytes())
}

fn error_of(response: &ParsedResponse) -> String {
    let body: ErrorBody = serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&response.body)));
    body.error
}

#[test]
fn every_endpoint_answers() {
    let f = fixture();
    let info = request(&f.path, "GET", "/v1/vm", "");
    assert_eq!(info.status, 200);
    let info: VmInfo = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(
        (info.state, info.vcpus, info.devices.len()),
        (VmState::Running, 2, 1)
    );

    assert_eq!(request(&f.path, "PUT", "/v1/vm/pause", "").status, 204);
    let again = request(&f.path, "PUT", "/v1/vm/pause", "");
    assert_eq!(
        (again.status, error_of(&again).as_str()),
        (409, "the VM is already paused")
    );
    let info: VmInfo = serde_json::from_slice(&request(&f.path, "GET", "/v1/vm", "").body).unwrap();
    assert_eq!(info.state, VmState::Paused);
    assert_eq!(request(&f.path, "PUT", "/v1/vm/resume", "").status, 204);
    assert_eq!(request(&f.path, "PUT", "/v1/vm/resume", "").status, 409);

    let snapshot = request(
        &f.path,
        "PUT",
        "/v1/vm/snapshot",
        r#"{"dir": "/snaps/a", "diff": true}"#,
    );
    assert_eq!(snapshot.status, 200);
    let snapshot: SnapshotInfo = serde_json::from_slice(&snapshot.body).unwrap();
    assert_eq!(
        (snapshot.dir, snapshot.diff),
        (PathBuf::from("/snaps/a"), true)
    );
    let full = request(&f.path, "PUT", "/v1/vm/snapshot", r#"{"dir": "/snaps/b"}"#);
    let full: SnapshotInfo = serde_json::from_slice(&full.body).unwrap();
    assert!(!full.diff, "diff defaults to false");

    let failed = request(&f.path, "PUT", "/v1/vm/snapshot", r#"{"dir": "/fail"}"#);
    assert_eq!(
        (failed.status, error_of(&failed).as_str()),
        (500, "disk full")
    );

    assert!(!f.vm.shutdown_requested.load(Ordering::SeqCst));
    assert_eq!(request(&f.path, "PUT", "/v1/vm/shutdown", "").status, 204);
    assert!(f.vm.shutdown_requested.load(Ordering::SeqCst));
}

#[test]
fn the_balloon_endpoint_needs_a_body_known_fields_and_a_balloon() {
    let f = fixture();
    let empty = request(&f.path, "PUT", "/v1/vm/balloon", "");
    assert_eq!(empty.status, 400);
    assert!(
        error_of(&empty).contains("target_mib"),
        "{}",
        error_of(&empty)
    );
    let unknown = request(&f.path, "PUT", "/v1/vm/balloon", r#"{"amount_mib": 1}"#);
    assert_eq!(unknown.status, 400);
    // The fake VM has no balloon device.
    let none = request(&f.path, "PUT", "/v1/vm/balloon", r#"{"target_mib": 1}"#);
    assert_eq!(none.status, 409, "{}", error_of(&none));
    assert_eq!(request(&f.path, "GET", "/v1/vm/balloon", "").status, 405);
}

#[test]
fn wrong_methods_get_405_with_allow() {
    let f = fixture();
    for (method, target) in [
        ("PUT", "/v1/vm"),
        ("POST", "/v1/vm"),
        ("get", "/v1/vm"),
        ("HEAD", "/v1/vm"),
        ("GET", "/v1/vm/pause"),
        ("DELETE", "/v1/vm/resume"),
        ("POST", "/v1/vm/snapshot"),
        ("GET", "/v1/vm/shutdown"),
    ] {
        let raw = format!("{method} {target} HTTP/1.1\r\n\r\n");
        let answer = String::from_utf8(exchange(&f.path, raw.as_bytes())).unwrap();
        let response = parse_response(answer.as_bytes()).unwrap();
        assert_eq!(response.status, 405, "{method} {target}");
        let allow = if target == "/v1/vm" { "GET" } else { "PUT" };
        assert!(
            answer.contains(&format!("\r\nAllow: {allow}\r\n")),
            "{answer}"
        );
        assert!(error_of(&response).contains(allow));
    }
    assert!(
        !f.vm.shutdown_requested.load(Ordering::SeqCst),
        "GET must not shut down"
    );
}

#[test]
fn unknown_paths_get_404_and_queries_are_ignored() {
    let f = fixture();
    for target in [
        "/",
        "/v1",
        "/v1/vm/",
        "/v2/vm",
        "/v1/vm/pause/now",
        "/V1/VM",
        "/v1/vm/../vm",
    ] {
        let response = request(&f.path, "GET", target, "");
        assert_eq!(response.status, 404, "{target}");
        assert!(error_of(&response).contains(target));
    }
    assert_eq!(request(&f.path, "GET", "/v1/vm?verbose=1", "").status, 200);
}

#[test]
fn malformed_http_gets_4xx_never_a_crash() {
    let f = fixture();
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n".to_vec(),
            400,
        ),
        (b"hello there\r\n\r\n".to_vec(), 400),
        (b"GET /v1/vm HTTP/2.0\r\n\r\n".to_vec(), 505),
        (
            b"PUT /v1/vm/snapshot HTTP/1.1\r\nContent-Length: ten\r\n\r\n".to_vec(),
            400,
        ),
        (
            b"PUT /v1/vm/snapshot HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n".to_vec(),
            413,
        ),
        (
            b"PUT /v1/vm/snapshot HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            411,
        ),
        // Truncated body: 100 bytes announced, 10 sent, then the client stops writing.
        (
            b"PUT /v1/vm/snapshot HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"dir\": \"".to_vec(),
            400,
        ),
        // Headers that never end, and headers that end too late.
        (vec![b'A'; 64 * 1024], 431),
        (
            [
                b"GET /v1/vm HTTP/1.1\r\nX: ".to_vec(),
                vec![b'y'; 20_000],
                b"\r\n\r\n".to_vec(),
            ]
            .concat(),
            431,
        ),
        // Cut off inside the head.
        (b"GET /v1/vm HTTP/1.1\r\nHost:".to_vec(), 400),
    ];
    for (bytes, status) in cases {
        let response = send(&f.path, &bytes);
        assert_eq!(
            response.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
        );
        assert!(!error_of(&response).is_empty());
    }
    assert_eq!(
        request(&f.path, "GET", "/v1/vm", "").status,
        200,
        "still serving"
    );
}

#[test]
fn bad_snapshot_bodies_get_400() {
    let f = fixture();
    for body in [
        "",
        "   ",
        "{",
        "not json",
        "[]",
        r#"{"diff": true}"#,
        r#"{"dir": 5}"#,
        r#"{"dir": "/x", "diff": "yes"}"#,
        r#"{"dir": "/x", "bogus": 1}"#,
        r#"{"dir": ""}"#,
        r#"{"dir": "relative/dir"}"#,
    ] {
        let response = request(&f.path, "PUT", "/v1/vm/snapshot", body);
        assert_eq!(response.status, 400, "{body:?}");
        assert!(!error_of(&response).is_empty());
    }
    assert_eq!(
        f.vm.snapshots.load(Ordering::SeqCst),
        0,
        "no bad body reached the VM"
    );
}

#[test]
fn a_relative_snapshot_dir_is_a_400_naming_it() {
    let f = fixture();
    for dir in ["relative/dir", "./snap", "../x", "snap"] {
        let body = format!(r#"{{"dir": "{dir}", "replace": true}}"#);
        let response = request(&f.path, "PUT", "/v1/vm/snapshot", &body);
        assert_eq!(response.status, 400, "{dir}");
        let error = error_of(&response);
        assert!(error.contains("absolute path"), "{error}");
        assert!(error.contains(dir), "{error}");
    }
    assert_eq!(f.vm.snapshots.load(Ordering::SeqCst), 0);
}

#[test]
fn the_replace_flag_reaches_the_vm_and_defaults_to_false() {
    let f = fixture();
    for (body, replace) in [
        (r#"{"dir": "/snaps/a"}"#, false),
        (r#"{"dir": "/snaps/a", "replace": false}"#, false),
        (r#"{"dir": "/snaps/a", "replace": true}"#, true),
        (
            r#"{"dir": "/snaps/a", "diff": true, "replace": true}"#,
            true,
        ),
    ] {
        let response = request(&f.path, "PUT", "/v1/vm/snapshot", body);
        assert_eq!(response.status, 200, "{body}");
        assert_eq!(
            f.vm.replace_flags.lock().unwrap().last(),
            Some(&replace),
            "{body}"
        );
    }
    let response = request(
        &f.path,
        "PUT",
        "/v1/vm/snapshot",
        r#"{"dir": "/snaps/a", "replace": "yes"}"#,
    );
    assert_eq!(response.status, 400);
    assert_eq!(f.vm.replace_flags.lock().unwrap().len(), 4);
}

/// The socket is 0600 even when the process's umask would allow everyone in: the mode is set
/// explicitly between bind and listen.
#[test]
fn socket_is_private_under_umask_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    // SAFETY: umask only changes the process's file creation mask; other tests create files
    // with explicit modes, so a briefly wider mask does not change what they check.
    let old = unsafe { libc::umask(0) };
    let server = ApiServer::start_with(
        &path,
        Arc::new(MockVm::default()),
        ApiServerConfig::default(),
    );
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let server = server.unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    drop(server);
}

#[test]
fn a_panicking_handler_is_a_500_and_the_server_survives() {
    let f = fixture();
    let response = request(&f.path, "PUT", "/v1/vm/snapshot", r#"{"dir": "/panic"}"#);
    assert_eq!(response.status, 500);
    assert!(error_of(&response).contains("panicked"));
    assert_eq!(request(&f.path, "GET", "/v1/vm", "").status, 200);
}

#[test]
fn slowloris_is_cut_off_while_others_are_served() {
    let f = fixture();
    let mut slow = UnixStream::connect(&f.path).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let drip = std::thread::spawn(move || {
        for byte in b"GET /v1/vm HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain([b'z'; 200].iter())
        {
            if slow.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut answer = Vec::new();
        let _ = slow.read_to_end(&mut answer);
        answer
    });
    std::thread::sleep(Duration::from_millis(50));
    let quick = Instant::now();
    assert_eq!(request(&f.path, "GET", "/v1/vm", "").status, 200);
    assert!(
        quick.elapsed() < TEST_TIMEOUT,
        "a slow client must not delay others"
    );

    let answer = drip.join().unwrap();
    let elapsed = started.elapsed();
    let response = parse_response(&answer).unwrap();
    assert_eq!(response.status, 408);
    assert!(elapsed >= TEST_TIMEOUT, "{elapsed:?}");
    assert!(
        elapsed < TEST_TIMEOUT * 5,
        "the deadline covers the whole request: {elapsed:?}"
    );
}

#[test]
fn a_silent_connection_times_out_and_a_vanishing_one_is_harmless() {
    let f = fixture();
    let mut silent = UnixStream::connect(&f.path).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    drop(UnixStream::connect(&f.path).unwrap());
    let mut answer = Vec::new();
    silent.read_to_end(&mut answer).unwrap();
    assert_eq!(parse_response(&answer).unwrap().status, 408);
    assert_eq!(request(&f.path, "GET", "/v1/vm", "").status, 200);
}

#[test]
fn expect_continue_gets_a_go_ahead() {
    let f = fixture();
    let mut stream = UnixStream::connect(&f.path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let body = br#"{"dir": "/snaps/c"}"#;
    let head = format!(
        "PUT /v1/vm/snapshot HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
    let mut got = vec![0u8; interim.len()];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(got, interim);
    stream.write_all(body).unwrap();
    // The connection stays open for more requests: end it from this side.
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    assert_eq!(parse_response(&answer).unwrap().status, 200);
}

#[test]
fn connections_beyond_the_limit_get_503() {
    let f = fixture_with(ApiServerConfig {
        request_timeout: Duration::from_secs(2),
        max_connections: 1,
        ..ApiServerConfig::default()
    });
    let idle = UnixStream::connect(&f.path).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let response = request(&f.path, "GET", "/v1/vm", "");
    assert_eq!(response.status, 503);
    drop(idle);
    // The slot frees once the idle connection's thread notices the hang-up.
    let deadline = Instant::now() + Duration::from_secs(3);
    while request(&f.path, "GET", "/v1/vm", "").status != 200 {
        assert!(Instant::now() < deadline, "the slot was never released");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn random_garbage_over_the_socket_never_kills_the_server() {
    let f = fixture();
    let mut seed: u64 = 0x1234_5678_9abc_def1;
    for round in 0..64 {
        let len = (round * 97) % 3000;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let answer = exchange(&f.path, &bytes);
        if !answer.is_empty() {
            let response = parse_response(&answer).unwrap();
            assert!(
                (400..600).contains(&response.status),
                "round {round}: {}",
                response.status
            );
        }
    }
    assert_eq!(request(&f.path, "GET", "/v1/vm", "").status, 200);
}

#[test]
fn socket_is_private_and_removed_on_drop() {
    let f = fixture();
    let meta = std::fs::metadata(&f.path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let path = f.path.clone();
    let Fixture { _dir, server, .. } = f;
    drop(server);
    assert!(!path.exists(), "socket file left behind");
    assert!(UnixStream::connect(&path).is_err());
}

#[test]
fn stop_is_idempotent_and_does_not_wait_for_idle_clients_forever() {
    let mut f = fixture_with(ApiServerConfig {
        request_timeout: Duration::from_secs(30),
        ..ApiServerConfig::default()
    });
    let _idle = UnixStream::connect(&f.path).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    f.server.stop();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(!f.path.exists());
    f.server.stop();
}

#[test]
fn stale_socket_is_replaced_live_one_and_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a dropped listener leaves its file behind");
    let vm: Arc<dyn VmControl> = Arc::new(MockVm::default());
    let server = ApiServer::start(&path, vm.clone()).unwrap();
    assert_eq!(request(&path, "GET", "/v1/vm", "").status, 200);

    let error = ApiServer::start(&path, vm.clone())
        .err()
        .expect("a live socket must not be replaced");
    assert!(error.to_string().contains("already serving"), "{error}");
    assert_eq!(
        request(&path, "GET", "/v1/vm", "").status,
        200,
        "the first server still works"
    );
    drop(server);

    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let error = ApiServer::start(&file, vm.clone())
        .err()
        .expect("a regular file must not be replaced");
    assert!(error.to_string().contains("not a socket"), "{error}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    let long = dir.path().join("x".repeat(200));
    assert!(ApiServer::start(&long, vm.clone()).is_err());
    let missing_dir = dir.path().join("no/such/dir/api.sock");
    assert!(ApiServer::start(&missing_dir, vm).is_err());
}

#[test]
fn dropping_a_server_leaves_a_successors_socket_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let vm: Arc<dyn VmControl> = Arc::new(MockVm::default());
    let first = ApiServer::start(&path, vm.clone()).unwrap();
    // Someone removed our socket and another server took the path.
    std::fs::remove_file(&path).unwrap();
    let second = ApiServer::start(&path, vm).unwrap();
    drop(first);
    assert!(
        path.exists(),
        "the first server deleted the second one's socket"
    );
    assert_eq!(request(&path, "GET", "/v1/vm", "").status, 200);
    drop(second);
    assert!(!path.exists());
}

#[test]
fn client_round_trip() {
    let f = fixture();
    let client = ApiClient::new(&f.path);
    let info = client.info().unwrap();
    assert_eq!(info, f.vm.info().unwrap());

    client.pause().unwrap();
    assert_eq!(client.info().unwrap().state, VmState::Paused);
    match client.pause() {
        Err(ClientError::Api {
            status: 409,
            message,
        }) => assert_eq!(message, "the VM is already paused"),
        other => panic!("{other:?}"),
    }
    client.resume().unwrap();
    assert!(matches!(
        client.resume(),
        Err(ClientError::Api { status: 409, .. })
    ));

    let snapshot = client
        .snapshot(Path::new("/snaps/1"), false, false)
        .unwrap();
    assert_eq!(
        (
            snapshot.dir.as_path(),
            snapshot.diff,
            snapshot.pages_written
        ),
        (Path::new("/snaps/1"), false, 42)
    );
    // A relative directory is resolved against the client's working directory.
    let relative = client.snapshot(Path::new("snaps/2"), true, true).unwrap();
    assert_eq!(
        relative.dir,
        std::env::current_dir().unwrap().join("snaps/2")
    );
    assert!(relative.diff);
    let error = client
        .snapshot(Path::new("/fail"), false, false)
        .unwrap_err();
    assert_eq!(*f.vm.replace_flags.lock().unwrap(), [false, true]);
    assert_eq!(error.to_string(), "disk full (HTTP 500)");

    client.shutdown().unwrap();
    assert!(f.vm.shutdown_requested.load(Ordering::SeqCst));
}

#[test]
fn client_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody.sock");
    let error = ApiClient::new(&missing).info().unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "no VM is listening on {}: no such socket",
            missing.display()
        )
    );

    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let error = ApiClient::new(&stale).pause().unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "no VM is listening on {}: connection refused",
            stale.display()
        )
    );

    // A listener that never answers: the client gives up after its timeout.
    let mute = dir.path().join("mute.sock");
    let _listener = UnixListener::bind(&mute).unwrap();
    let started = Instant::now();
    let error = ApiClient::new(&mute)
        .with_timeout(Duration::from_millis(200))
        .info()
        .unwrap_err();
    assert!(matches!(error, ClientError::Timeout { .. }), "{error}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // Something that is not our server.
    let liar = dir.path().join("liar.sock");
    let listener = UnixListener::bind(&liar).unwrap();
    let answer = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf);
        stream.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    });
    let error = ApiClient::new(&liar).info().unwrap_err();
    assert!(matches!(error, ClientError::BadResponse { .. }), "{error}");
    answer.join().unwrap();
}

#[test]
fn vsock_connect_upgrades_the_connection_or_says_why_not() {
    let fx = fixture();
    let client = ApiClient::new(fx.path.clone()).with_timeout(Duration::from_secs(5));
    let mut stream = client.connect_vsock(1024).unwrap();
    stream.write_all(b"ping through the API socket").unwrap();
    let mut echoed = [0u8; 27];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"ping through the API socket");

    match client.connect_vsock(7) {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status, 503);
            assert!(message.contains("vsock port 7"), "{message}");
        }
        other => panic!("expected a 503, got {other:?}"),
    }
    // Bad bodies and methods are ordinary errors.
    let r = request(&fx.path, "PUT", "/v1/vsock/connect", r#"{"port":"x"}"#);
    assert_eq!(r.status, 400);
    let r = request(&fx.path, "GET", "/v1/vsock/connect", "");
    assert_eq!(r.status, 405);
    // Bytes sent before the answer would be lost: refused.
    let raw = b"PUT /v1/vsock/connect HTTP/1.1\r\nContent-Length: 13\r\n\r\n{\"port\":1024}early";
    assert_eq!(send(&fx.path, raw).status, 400);
}

#[test]
fn agent_wait_answers_or_times_out() {
    let fx = fixture();
    let client = ApiClient::new(fx.path.clone());
    let info = client.wait_agent(Duration::from_secs(1)).unwrap();
    assert_eq!(info.version, "mock");
    match client.wait_agent(Duration::ZERO) {
        Err(ClientError::Api { status: 504, .. }) => {}
        other => panic!("expected a 504, got {other:?}"),
    }
    let r = request(&fx.path, "PUT", "/v1/agent/wait", r#"{"timeout":1}"#);
    assert_eq!(r.status, 400);
}

/// A socket bound before its VM exists: a client that connects in between is answered once the
/// VM is served; a socket dropped unserved leaves no file behind.
#[test]
fn a_bound_socket_queues_clients_until_served_and_cleans_up_unserved() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let socket = crate::ApiSocket::bind(&path).unwrap();
    assert!(path.exists());
    let early = std::thread::spawn({
        let path = path.clone();
        move || {
            send(
                &path,
                b"GET /v1/vm HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            )
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let server = socket.serve(Arc::new(MockVm::default())).unwrap();
    assert_eq!(early.join().unwrap().status, 200);
    drop(server);
    assert!(!path.exists());

    let unserved = crate::ApiSocket::bind(&path).unwrap();
    drop(unserved);
    assert!(!path.exists(), "an unserved socket must be removed");
}

#[test]
fn rate_limiters_are_patched_with_firecrackers_json() {
    let f = fixture();
    let body = r#"{"rate_limiter": {"bandwidth": {"size": 52428800, "one_time_burst": 1048576, "refill_time": 1000}, "ops": {"size": 0, "refill_time": 0}}}"#;
    let answer = request(&f.path, "PATCH", "/v1/vm/drives/0", body);
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let drive: DriveUpdate = serde_json::from_slice(&answer.body).unwrap();
    let limiter = drive.rate_limiter.unwrap();
    assert_eq!(
        limiter.bandwidth,
        Some(TokenBucket {
            size: 50 << 20,
            one_time_burst: Some(1 << 20),
            refill_time: 1000
        })
    );
    assert_eq!(limiter.ops.unwrap().size, 0);

    let net = r#"{"rx_rate_limiter": {"ops": {"size": 1000, "refill_time": 1000}}, "tx_rate_limiter": {}}"#;
    let answer = request(&f.path, "PATCH", "/v1/vm/nets/12", net);
    assert_eq!(answer.status, 200);
    let updates = f.vm.limit_updates.lock().unwrap().clone();
    assert_eq!(updates.len(), 2);
    assert_eq!((updates[1].0, updates[1].1), ("net", 12));
    assert!(
        updates[1].2.contains(r#""tx_rate_limiter":{}"#),
        "{}",
        updates[1].2
    );

    // Errors: unknown device, bad JSON, unknown fields, no body, wrong method, bad index.
    let missing = request(&f.path, "PATCH", "/v1/vm/drives/1", body);
    assert_eq!(
        (missing.status, error_of(&missing).as_str()),
        (400, "the VM has no disk 1")
    );
    for bad in [
        "{",
        r#"{"rate_limiter": {"bandwidth": {"size": 1}}}"#,
        r#"{"rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1, "x": 2}}}"#,
        r#"{"rate_limiter": {"bandwidth": {"size": -1, "refill_time": 1}}}"#,
        r#"{"drive_id": "rootfs"}"#,
        "",
    ] {
        let answer = request(&f.path, "PATCH", "/v1/vm/drives/0", bad);
        assert_eq!(answer.status, 400, "{bad}: {}", error_of(&answer));
    }
    let empty = request(&f.path, "PATCH", "/v1/vm/nets/0", "");
    assert!(
        error_of(&empty).contains("rx_rate_limiter"),
        "{}",
        error_of(&empty)
    );
    let put = request(&f.path, "PUT", "/v1/vm/drives/0", body);
    assert_eq!(put.status, 405);
    assert!(error_of(&put).contains("use PATCH"), "{}", error_of(&put));
    for target in [
        "/v1/vm/drives/",
        "/v1/vm/drives/x",
        "/v1/vm/drives/-1",
        "/v1/vm/drives/99999",
        "/v1/vm/drives/0/x",
        "/v1/vm/nets/+1",
    ] {
        assert_eq!(
            request(&f.path, "PATCH", target, body).status,
            404,
            "{target}"
        );
    }
    assert_eq!(
        f.vm.limit_updates.lock().unwrap().len(),
        2,
        "no bad request reached the VM"
    );

    // The client speaks the same JSON.
    let client = ApiClient::new(&f.path);
    let update = NetUpdate {
        rx_rate_limiter: None,
        tx_rate_limiter: Some(RateLimiter {
            bandwidth: Some(TokenBucket {
                size: 1 << 20,
                one_time_burst: None,
                refill_time: 100,
            }),
            ops: None,
        }),
    };
    assert_eq!(client.update_net(3, &update).unwrap(), update);
    assert!(matches!(
        client.update_drive(5, &DriveUpdate::default()),
        Err(ClientError::Api { status: 400, .. })
    ));
}

/// A VM that also answers paths outside `/v1/` (as the Firecracker layer does).
struct ForeignRoutes(MockVm);

impl VmControl for ForeignRoutes {
    fn pause(&self) -> Result<(), ApiError> {
        self.0.pause()
    }
    fn resume(&self) -> Result<(), ApiError> {
        self.0.resume()
    }
    fn snapshot(&self, req: SnapshotRequest) -> Result<SnapshotInfo, ApiError> {
        self.0.snapshot(req)
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        self.0.shutdown()
    }
    fn info(&self) -> Result<VmInfo, ApiError> {
        self.0.info()
    }
    fn route_foreign(&self, request: &http::Request) -> Option<http::Response> {
        (request.path == "/version").then(|| http::Response::json(200, &"foreign"))
    }
}

#[test]
fn paths_outside_v1_go_to_route_foreign_and_v1_stays_dormouses() {
    let vm = ForeignRoutes(MockVm::default());
    let get = |path: &str| {
        router::route(
            &vm,
            &http::Request {
                method: "GET".into(),
                path: path.into(),
                body: Vec::new(),
            },
        )
    };
    let foreign = get("/version");
    assert_eq!(foreign.status, 200);
    assert_eq!(foreign.body.as_deref(), Some(&b"\"foreign\""[..]));
    // Not claimed by the foreign router: dormouse's 404 as before.
    assert_eq!(get("/vm/config").status, 404);
    assert_eq!(get("/v1/vm").status, 200);
}

#[test]
fn get_metrics_serves_prometheus_text_with_the_request_counts() {
    let f = fixture();
    assert_eq!(request(&f.path, "PUT", "/v1/vm/pause", "").status, 204);
    assert_eq!(request(&f.path, "GET", "/v1/nothing", "").status, 404);
    let answer = String::from_utf8(exchange(
        &f.path,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    ))
    .unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4\r\n"),
        "{head}"
    );
    // The scrape itself is counted after it is answered.
    assert!(
        body.contains("dormouse_api_requests_total{vm_id=\"mock\"} 2\n"),
        "{body}"
    );
    assert!(
        body.contains("dormouse_api_request_errors_total{vm_id=\"mock\"} 1\n"),
        "{body}"
    );
    // Only GET: PUT is Firecracker's (on its socket), anything else here a 405.
    let raw = String::from_utf8(exchange(&f.path, b"PUT /metrics HTTP/1.1\r\n\r\n")).unwrap();
    assert!(raw.starts_with("HTTP/1.1 405"), "{raw}");
    assert!(raw.contains("\r\nAllow: GET\r\n"), "{raw}");
    let counts = f.vm.metrics().unwrap();
    assert_eq!(counts.api().requests_count.get(), 4);
    assert_eq!(counts.api().requests_fails.get(), 2);
}

/// Reads one answer off a kept-alive connection (by its Content-Length; none on a 204) and
/// returns it with its head.
fn read_one(stream: &mut UnixStream) -> (ParsedResponse, String) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed inside a head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf.clone()).unwrap();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    buf.extend_from_slice(&body);
    (parse_response(&buf).unwrap(), head)
}

fn get_vm(version: &str, extra_headers: &str) -> String {
    format!("GET /v1/vm {version}\r\nHost: x\r\n{extra_headers}\r\n")
}

/// The connection ended: the next read sees EOF (not a timeout).
fn assert_closed(stream: &mut UnixStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

#[test]
fn two_requests_on_one_connection() {
    let f = fixture();
    let mut stream = UnixStream::connect(&f.path).unwrap();
    stream.write_all(get_vm("HTTP/1.1", "").as_bytes()).unwrap();
    let (first, head) = read_one(&mut stream);
    assert_eq!(first.status, 200);
    assert!(head.contains("Connection: keep-alive\r\n"), "{head}");
    stream
        .write_all(b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    assert_eq!(read_one(&mut stream).0.status, 204);
    assert!(*f.vm.paused.lock().unwrap());
    // An answer with an error the router gave (the body was read whole) keeps the connection.
    stream
        .write_all(b"GET /v1/nowhere HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(read_one(&mut stream).0.status, 404);
    stream.write_all(get_vm("HTTP/1.1", "").as_bytes()).unwrap();
    assert_eq!(read_one(&mut stream).0.status, 200);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let f = fixture();
    let mut stream = UnixStream::connect(&f.path).unwrap();
    let pipelined = format!(
        "{}PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n{}GET /v1/nowhere HTTP/1.1\r\n\r\n",
        get_vm("HTTP/1.1", ""),
        get_vm("HTTP/1.1", ""),
    );
    stream.write_all(pipelined.as_bytes()).unwrap();
    let statuses: Vec<u16> = (0..4).map(|_| read_one(&mut stream).0.status).collect();
    assert_eq!(statuses, [200, 204, 200, 404]);
    let (last, _) = read_one_after_close(&mut stream, &get_vm("HTTP/1.1", "Connection: close\r\n"));
    assert_eq!(last.status, 200);
}

fn read_one_after_close(stream: &mut UnixStream, request: &str) -> (ParsedResponse, String) {
    stream.write_all(request.as_bytes()).unwrap();
    let answer = read_one(stream);
    assert_closed(stream);
    answer
}

#[test]
fn connection_close_from_the_client_is_honoured() {
    let f = fixture();
    let mut stream = UnixStream::connect(&f.path).unwrap();
    let (response, head) =
        read_one_after_close(&mut stream, &get_vm("HTTP/1.1", "Connection: Close\r\n"));
    assert_eq!(response.status, 200);
    assert!(head.contains("Connection: close\r\n"), "{head}");
    // Among other options too.
    let mut stream = UnixStream::connect(&f.path).unwrap();
    read_one_after_close(
        &mut stream,
        &get_vm("HTTP/1.1", "Connection: TE, close\r\n"),
    );
}

#[test]
fn http_1_0_requests_keep_the_connection_as_firecracker_does() {
    let f = fixture();
    let mut stream = UnixStream::connect(&f.path).unwrap();
    for _ in 0..2 {
        stream.write_all(get_vm("HTTP/1.0", "").as_bytes()).unwrap();
        let (response, head) = read_one(&mut stream);
        assert_eq!(response.status, 200);
        assert!(head.contains("Connection: keep-alive\r\n"), "{head}");
    }
    read_one_after_close(&mut stream, &get_vm("HTTP/1.0", "Connection: close\r\n"));
}

#[test]
fn an_unreadable_request_closes_the_connection_after_its_answer() {
    let f = fixture();
    // The body is too large to read: what follows it cannot be told from a next request.
    let mut stream = UnixStream::connect(&f.path).unwrap();
    let head = format!(
        "PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        crate::http::MAX_BODY_BYTES + 1
    );
    let (response, head) = read_one_after_close(&mut stream, &head);
    assert_eq!(response.status, 413);
    assert!(head.contains("Connection: close\r\n"), "{head}");
    let mut stream = UnixStream::connect(&f.path).unwrap();
    assert_eq!(
        read_one_after_close(
            &mut stream,
            "GET /v1/vm HTTP/1.1\r\nContent-Length: x\r\n\r\n"
        )
        .0
        .status,
        400
    );
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let f = fixture_with(ApiServerConfig {
        request_timeout: TEST_TIMEOUT,
        idle_timeout: Duration::from_millis(300),
        ..ApiServerConfig::default()
    });
    let mut stream = UnixStream::connect(&f.path).unwrap();
    stream.write_all(get_vm("HTTP/1.1", "").as_bytes()).unwrap();
    assert_eq!(read_one(&mut stream).0.status, 200);
    let started = Instant::now();
    assert_closed(&mut stream);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[test]
fn an_idle_keep_alive_client_holds_one_slot_and_blocks_nobody_else() {
    let f = fixture_with(ApiServerConfig {
        request_timeout: TEST_TIMEOUT,
        max_connections: 2,
        idle_timeout: Duration::from_secs(3),
    });
    let mut idle = UnixStream::connect(&f.path).unwrap();
    idle.write_all(get_vm("HTTP/1.1", "").as_bytes()).unwrap();
    assert_eq!(read_one(&mut idle).0.status, 200);
    // Others (dormouse's own client among them) are served beside it, well before the idle
    // timeout (a closed connection's slot frees a moment after its answer, hence the retries).
    let served_soon = || {
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            match request(&f.path, "GET", "/v1/vm", "").status {
                200 => return,
                503 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                other => panic!("{other}"),
            }
        }
    };
    for _ in 0..3 {
        served_soon();
    }
    let client = ApiClient::new(&f.path);
    assert!(client.info().is_ok());
    served_soon();
    // The cap counts kept-alive connections: a second idle one fills it (once the last closed
    // connection's slot is free, hence the retries), a third is refused…
    let deadline = Instant::now() + Duration::from_millis(500);
    let _second = loop {
        let mut second = UnixStream::connect(&f.path).unwrap();
        // A refusal answers and closes without reading, so this write may meet a closed peer.
        let _ = second.write_all(get_vm("HTTP/1.1", "").as_bytes());
        match read_one(&mut second).0.status {
            200 => break second,
            503 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            other => panic!("{other}"),
        }
    };
    assert_eq!(request(&f.path, "GET", "/v1/vm", "").status, 503);
    // …until the idle timeout frees the slots.
    let deadline = Instant::now() + Duration::from_secs(6);
    while request(&f.path, "GET", "/v1/vm", "").status != 200 {
        assert!(Instant::now() < deadline, "idle slots never released");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stop_closes_idle_keep_alive_connections_at_once() {
    let mut f = fixture_with(ApiServerConfig {
        request_timeout: TEST_TIMEOUT,
        idle_timeout: Duration::from_secs(60),
        ..ApiServerConfig::default()
    });
    let mut stream = UnixStream::connect(&f.path).unwrap();
    stream.write_all(get_vm("HTTP/1.1", "").as_bytes()).unwrap();
    assert_eq!(read_one(&mut stream).0.status, 200);
    let started = Instant::now();
    f.server.stop();
    assert_closed(&mut stream);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}
