//! A Firecracker client from crates.io, `firecracker-rs-sdk` 0.1.0 (pinned), drives
//! `dormouse firecracker`: configure, `InstanceStart` of the Linux guest, exec through the
//! hybrid vsock socket, pause, `snapshot/create`, `snapshot/load` with `resume_vm` in a new
//! process, and the guest answers again (docs/firecracker.md, "Clients from crates.io").
//!
//! The crate's own request encoder, models and response decoder are used for every Firecracker
//! call. Its `Instance` transport is not: it keeps one connection for all requests, which
//! dormouse's API server closes after each answer (Firecracker keeps it open), so each call
//! here goes on a fresh connection, as urllib3-based clients do.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use firecracker_rs_sdk::events::{
    CreateSnapshot, CreateSyncAction, DescribeInstance, EventTrait, GetFirecrackerVersion,
    LoadSnapshot, PatchVm, PutGuestBootSource, PutGuestDriveByID, PutGuestVsock,
    PutMachineConfiguration, RequestTrait, ResponseTrait,
};
use firecracker_rs_sdk::models::{
    ActionType, BackendType, BootSource, Drive, Empty, InstanceActionInfo, InstanceState,
    MachineConfiguration, MemoryBackend, SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
    Vm, VmState, Vsock,
};
use tests::*;

/// One SDK event on a fresh connection: the crate encodes the request and decodes the answer.
/// An error carries the crate's error and the raw answer (the crate decodes a 400's
/// `fault_message` body as a type mismatch, not as the fault).
fn sdk<E: EventTrait>(sock: &Path, event: E) -> Result<<E as ResponseTrait>::Payload, String> {
    let mut stream = UnixStream::connect(sock).expect("connect to the API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let request = RequestTrait::encode(&event).map_err(|e| e.to_string())?;
    stream.write_all(&request).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    E::decode(&answer).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&answer)))
}

fn firecracker(sock: &Path) -> Running {
    let mut cmd = Command::new(dormouse_bin());
    cmd.args(["firecracker", "--id", "fc-rs-sdk", "--api-sock"])
        .arg(sock);
    let running = Running::spawn(cmd);
    wait_for_socket(sock);
    running
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

/// Waits for the guest agent's announcement through dormouse's own route (the SDK has none).
fn wait_agent(sock: &Path) {
    let body = format!("{{\"timeout_ms\": {}}}", LINUX_BOOT_TIMEOUT.as_millis());
    let mut stream = UnixStream::connect(sock).expect("connect to the API socket");
    stream
        .set_read_timeout(Some(LINUX_BOOT_TIMEOUT + Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "PUT /v1/agent/wait HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "agent not ready: {answer}"
    );
}

/// `echo WORD` in the guest through the hybrid vsock socket (Firecracker's `CONNECT 1024`).
fn echo_over_hybrid_vsock(uds: &Path, word: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let output = runtime.block_on(async {
        let client = agent_client::AgentClient::connect_hybrid_vsock(uds, 1024)
            .await
            .expect("agent over the hybrid vsock socket");
        client
            .exec(&agent_client::ExecCommand::new("echo").arg(word))
            .await
            .expect("exec echo")
    });
    assert_eq!(String::from_utf8_lossy(&output.stdout), format!("{word}\n"));
}

#[test]
fn firecracker_rs_sdk_drives_a_linux_guest_through_snapshot_and_load() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = agent_rootfs(dir.path());
    let _serial = linux_boot_lock();
    let sock = dir.path().join("fc.sock");
    let uds = dir.path().join("v.sock");
    let first = firecracker(&sock);

    let version = sdk(&sock, GetFirecrackerVersion(&Empty)).expect("GET /version");
    assert_eq!(version.firecracker_version, "1.16.0");
    sdk(
        &sock,
        PutGuestBootSource(&BootSource {
            boot_args: Some("console=ttyS0 reboot=k panic=-1".into()),
            // The SDK sends `"initrd_path": null`: accepted, as by Firecracker.
            initrd_path: None,
            kernel_image_path: vmlinux(),
        }),
    )
    .expect("PUT /boot-source");
    sdk(
        &sock,
        PutGuestDriveByID(&Drive {
            drive_id: "rootfs".into(),
            partuuid: None,
            is_root_device: true,
            cache_type: None,
            is_read_only: false,
            path_on_host: rootfs,
            rate_limiter: None,
            io_engine: None,
            socket: None,
        }),
    )
    .expect("PUT /drives/rootfs");
    sdk(
        &sock,
        PutMachineConfiguration(&MachineConfiguration {
            cpu_template: None,
            smt: None,
            mem_size_mib: 256,
            track_dirty_pages: None,
            vcpu_count: 1,
            huge_pages: None,
        }),
    )
    .expect("PUT /machine-config");
    sdk(
        &sock,
        PutGuestVsock(&Vsock {
            guest_cid: 3,
            uds_path: uds.clone(),
            vsock_id: None,
        }),
    )
    .expect("PUT /vsock");
    // A field dormouse cannot honour comes back as the SDK's error, not as a silent accept.
    let smt = sdk(
        &sock,
        PutMachineConfiguration(&MachineConfiguration {
            cpu_template: None,
            smt: Some(true),
            mem_size_mib: 256,
            track_dirty_pages: None,
            vcpu_count: 1,
            huge_pages: None,
        }),
    );
    assert!(smt.is_err(), "smt: true accepted: {smt:?}");

    sdk(
        &sock,
        CreateSyncAction(&InstanceActionInfo {
            action_type: ActionType::InstanceStart,
        }),
    )
    .expect("InstanceStart");
    wait_agent(&sock);
    echo_over_hybrid_vsock(&uds, "before");

    sdk(
        &sock,
        PatchVm(&Vm {
            state: VmState::Paused,
        }),
    )
    .expect("PATCH /vm Paused");
    let info = sdk(&sock, DescribeInstance(&Empty)).expect("GET /");
    assert_eq!(info.state, InstanceState::Paused);
    let snapshot_path = dir.path().join("linux.snap");
    let mem_file_path = dir.path().join("linux.mem");
    sdk(
        &sock,
        CreateSnapshot(&SnapshotCreateParams {
            mem_file_path: mem_file_path.clone(),
            snapshot_path: snapshot_path.clone(),
            snapshot_type: Some(SnapshotType::Full),
            version: None,
        }),
    )
    .expect("PUT /snapshot/create");
    drop(first);

    // The SDK's SnapshotLoadParams has no `vsock_override`: the clone binds the snapshot's
    // uds_path again, free now that the first process is gone.
    let _ = std::fs::remove_file(&uds);
    let sock2 = dir.path().join("fc2.sock");
    let second = firecracker(&sock2);
    let loaded = Instant::now();
    sdk(
        &sock2,
        LoadSnapshot(&SnapshotLoadParams {
            enable_diff_snapshots: None,
            mem_file_path: None,
            mem_backend: Some(MemoryBackend {
                backend_type: BackendType::File,
                backend_path: mem_file_path,
            }),
            resume_vm: Some(true),
            snapshot_path,
        }),
    )
    .expect("PUT /snapshot/load");
    wait_agent(&sock2);
    eprintln!(
        "firecracker-rs-sdk e2e: agent re-announced {:.2?} after snapshot/load",
        loaded.elapsed()
    );
    echo_over_hybrid_vsock(&uds, "after");
    let info = sdk(&sock2, DescribeInstance(&Empty)).expect("GET /");
    assert_eq!(info.state, InstanceState::Running);
    drop(second);
}

/// Method, path and JSON body of the request the SDK encodes for `event`.
fn encoded<E: EventTrait>(event: E) -> (String, String, serde_json::Value) {
    let bytes = RequestTrait::encode(&event).expect("the SDK encodes the request");
    let text = String::from_utf8(bytes).expect("UTF-8 request");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let mut line = head.lines().next().unwrap_or_default().split(' ');
    let method = line.next().unwrap_or_default().to_string();
    let path = line.next().unwrap_or_default().to_string();
    assert_eq!(
        head.lines()
            .find_map(|h| h.strip_prefix("Content-Length: "))
            .map(|n| n.parse::<usize>().unwrap()),
        Some(body.len()),
        "{head}"
    );
    (
        method,
        path,
        serde_json::from_str(body).expect("a JSON body"),
    )
}

/// The SDK's requests for the calls above, against the bodies in Firecracker's API description
/// and docs (`docs/getting-started.md`, `docs/snapshotting/snapshot-support.md`): same method,
/// path and JSON, except where noted.
#[test]
fn firecracker_rs_sdk_requests_match_firecrackers_examples() {
    use serde_json::json;
    let boot = encoded(PutGuestBootSource(&BootSource {
        boot_args: Some("console=ttyS0 reboot=k panic=1 pci=off".into()),
        initrd_path: None,
        kernel_image_path: "./vmlinux".into(),
    }));
    // The one difference: `initrd_path` is sent as null rather than left out.
    assert_eq!(
        boot,
        (
            "PUT".into(),
            "/boot-source".into(),
            json!({"kernel_image_path": "./vmlinux",
                   "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
                   "initrd_path": null})
        )
    );
    let drive = encoded(PutGuestDriveByID(&Drive {
        drive_id: "rootfs".into(),
        partuuid: None,
        is_root_device: true,
        cache_type: None,
        is_read_only: false,
        path_on_host: "./rootfs.ext4".into(),
        rate_limiter: None,
        io_engine: None,
        socket: None,
    }));
    assert_eq!(
        drive,
        (
            "PUT".into(),
            "/drives/rootfs".into(),
            json!({"drive_id": "rootfs", "path_on_host": "./rootfs.ext4",
                   "is_root_device": true, "is_read_only": false})
        )
    );
    let machine = encoded(PutMachineConfiguration(&MachineConfiguration {
        cpu_template: None,
        smt: Some(false),
        mem_size_mib: 1024,
        track_dirty_pages: None,
        vcpu_count: 2,
        huge_pages: None,
    }));
    assert_eq!(
        machine,
        (
            "PUT".into(),
            "/machine-config".into(),
            json!({"vcpu_count": 2, "mem_size_mib": 1024, "smt": false})
        )
    );
    let vsock = encoded(PutGuestVsock(&Vsock {
        guest_cid: 3,
        uds_path: "./v.sock".into(),
        vsock_id: None,
    }));
    assert_eq!(
        vsock,
        (
            "PUT".into(),
            "/vsock".into(),
            json!({"guest_cid": 3, "uds_path": "./v.sock"})
        )
    );
    let start = encoded(CreateSyncAction(&InstanceActionInfo {
        action_type: ActionType::InstanceStart,
    }));
    assert_eq!(
        start,
        (
            "PUT".into(),
            "/actions".into(),
            json!({"action_type": "InstanceStart"})
        )
    );
    let pause = encoded(PatchVm(&Vm {
        state: VmState::Paused,
    }));
    assert_eq!(
        pause,
        ("PATCH".into(), "/vm".into(), json!({"state": "Paused"}))
    );
    let create = encoded(CreateSnapshot(&SnapshotCreateParams {
        mem_file_path: "./mem_file".into(),
        snapshot_path: "./snapshot_file".into(),
        snapshot_type: Some(SnapshotType::Diff),
        version: None,
    }));
    assert_eq!(
        create,
        (
            "PUT".into(),
            "/snapshot/create".into(),
            json!({"snapshot_type": "Diff", "snapshot_path": "./snapshot_file",
                   "mem_file_path": "./mem_file"})
        )
    );
    let load = encoded(LoadSnapshot(&SnapshotLoadParams {
        enable_diff_snapshots: None,
        mem_file_path: None,
        mem_backend: Some(MemoryBackend {
            backend_type: BackendType::File,
            backend_path: "./mem_file".into(),
        }),
        resume_vm: Some(false),
        snapshot_path: "./snapshot_file".into(),
    }));
    assert_eq!(
        load,
        (
            "PUT".into(),
            "/snapshot/load".into(),
            json!({"snapshot_path": "./snapshot_file",
                   "mem_backend": {"backend_path": "./mem_file", "backend_type": "File"},
                   "resume_vm": false})
        )
    );
}
