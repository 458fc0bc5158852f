//! A Firecracker client from crates.io, `firecracker-rs-sdk` 0.1.0 (pinned), drives
//! `dormouse firecracker`: configure, `InstanceStart` of the Linux guest, exec through the
//! hybrid vsock socket, pause, `snapshot/create`, `snapshot/load` with `resume_vm` in a new
//! process, and the guest answers again (docs/firecracker.md, "Clients from crates.io").
//!
//! Everything goes through the crate's own `Instance`, unchanged: it starts the binary it is
//! given (a link named `firecracker` to dormouse) and keeps one connection to the API socket
//! for all its requests (HTTP/1.0 requests, which Firecracker's server keeps alive, and so does
//! dormouse's).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use firecracker_rs_sdk::events::{
    CreateSnapshot, CreateSyncAction, EventTrait, LoadSnapshot, PatchVm, PutGuestBootSource,
    PutGuestDriveByID, PutGuestVsock, PutMachineConfiguration, RequestTrait,
};
use firecracker_rs_sdk::firecracker::FirecrackerOption;
use firecracker_rs_sdk::instance::Instance;
use firecracker_rs_sdk::models::{
    ActionType, BackendType, BootSource, Drive, InstanceActionInfo, InstanceState,
    MachineConfiguration, MemoryBackend, SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
    Vm, VmState, Vsock,
};
use tests::*;

/// The SDK's `Instance` on a `firecracker` link to dormouse, its process started and its
/// connection open.
fn firecracker(dir: &Path, sock: &Path) -> Instance {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("firecracker");
    if !link.exists() {
        std::os::unix::fs::symlink(dormouse_bin(), &link).unwrap();
    }
    let mut instance = FirecrackerOption::new(&link)
        .api_sock(sock)
        .id("fc-rs-sdk")
        .build()
        .expect("the SDK builds the instance");
    instance
        .start_vmm()
        .expect("the SDK starts dormouse and connects");
    instance
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
        "PUT /v1/agent/wait HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
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
    let mut first = firecracker(dir.path(), &sock);

    let version = first.get_firecracker_version().expect("GET /version");
    assert_eq!(version.firecracker_version, "1.16.0");
    first
        .put_guest_boot_source(&BootSource {
            boot_args: Some("console=ttyS0 reboot=k panic=-1".into()),
            // The SDK sends `"initrd_path": null`: accepted, as by Firecracker.
            initrd_path: None,
            kernel_image_path: vmlinux(),
        })
        .expect("PUT /boot-source");
    first
        .put_guest_drive_by_id(&Drive {
            drive_id: "rootfs".into(),
            partuuid: None,
            is_root_device: true,
            cache_type: None,
            is_read_only: false,
            path_on_host: rootfs,
            rate_limiter: None,
            io_engine: None,
            socket: None,
        })
        .expect("PUT /drives/rootfs");
    first
        .put_machine_configuration(&MachineConfiguration {
            cpu_template: None,
            smt: None,
            mem_size_mib: 256,
            track_dirty_pages: None,
            vcpu_count: 1,
            huge_pages: None,
        })
        .expect("PUT /machine-config");
    first
        .put_guest_vsock(&Vsock {
            guest_cid: 3,
            uds_path: uds.clone(),
            vsock_id: None,
        })
        .expect("PUT /vsock");
    // A field dormouse cannot honour comes back as the SDK's error, not as a silent accept;
    // the connection stays usable after it.
    let smt = first.put_machine_configuration(&MachineConfiguration {
        cpu_template: None,
        smt: Some(true),
        mem_size_mib: 256,
        track_dirty_pages: None,
        vcpu_count: 1,
        huge_pages: None,
    });
    assert!(smt.is_err(), "smt: true accepted: {smt:?}");

    first.start().expect("InstanceStart");
    wait_agent(&sock);
    echo_over_hybrid_vsock(&uds, "before");

    first.pause().expect("PATCH /vm Paused");
    let info = first.describe_instance().expect("GET /");
    assert_eq!(info.state, InstanceState::Paused);
    let snapshot_path = dir.path().join("linux.snap");
    let mem_file_path = dir.path().join("linux.mem");
    first
        .create_snapshot(&SnapshotCreateParams {
            mem_file_path: mem_file_path.clone(),
            snapshot_path: snapshot_path.clone(),
            snapshot_type: Some(SnapshotType::Full),
            version: None,
        })
        .expect("PUT /snapshot/create");
    // The SDK's clean-up: SIGTERM to the process, the socket removed.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&uds).is_ok() {
        assert!(Instant::now() < deadline, "the first dormouse did not end");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The SDK's SnapshotLoadParams has no `vsock_override`: the clone binds the snapshot's
    // uds_path again, free now that the first process is gone.
    let _ = std::fs::remove_file(&uds);
    let sock2 = dir.path().join("fc2.sock");
    let mut second = firecracker(dir.path(), &sock2);
    let loaded = Instant::now();
    second
        .load_snapshot(&SnapshotLoadParams {
            enable_diff_snapshots: None,
            mem_file_path: None,
            mem_backend: Some(MemoryBackend {
                backend_type: BackendType::File,
                backend_path: mem_file_path,
            }),
            resume_vm: Some(true),
            snapshot_path,
        })
        .expect("PUT /snapshot/load");
    wait_agent(&sock2);
    eprintln!(
        "firecracker-rs-sdk e2e: agent re-announced {:.2?} after snapshot/load",
        loaded.elapsed()
    );
    echo_over_hybrid_vsock(&uds, "after");
    let info = second.describe_instance().expect("GET /");
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
