//! The request types against Firecracker's own examples (its `tests/framework/
//! vm_config_network.json` and the bodies in `docs/snapshotting/snapshot-support.md` and
//! `docs/getting-started.md`), and the router's answers with a mock launcher.

use std::sync::{Arc, Mutex, OnceLock};

use vmm_api::http::{Request, Response};

use super::types::*;
use super::*;

/// Firecracker's `tests/framework/vm_config_network.json`, as published.
const FC_VM_CONFIG_NETWORK: &str = include_str!("tests_vm_config_network.json");

/// A boot the mock launcher was asked for: kernel, command line, vCPUs, MiB, disks (path,
/// read-only, id).
type Started = (
    String,
    Option<String>,
    u8,
    u64,
    Vec<(String, bool, Option<String>)>,
);

/// What the mock launcher was asked to build.
#[derive(Default)]
struct Calls {
    starts: Vec<Started>,
    /// Each start: per interface, the MMDS address it serves (if any).
    mmds: Vec<Vec<Option<std::net::Ipv4Addr>>>,
    /// Each restore: directory, per saved NIC the TAP override, the vsock socket override.
    restores: Vec<(
        std::path::PathBuf,
        Vec<Option<String>>,
        Option<std::path::PathBuf>,
    )>,
}

struct MockLauncher(Arc<Mutex<Calls>>);

impl Launcher for MockLauncher {
    fn start(&self, config: vmm::VmConfig) -> Result<vmm::VmController, String> {
        self.0.lock().unwrap().mmds.push(
            config
                .nets
                .iter()
                .map(|n| n.mmds.as_ref().map(|m| m.ipv4))
                .collect(),
        );
        self.0.lock().unwrap().starts.push((
            config.kernel.display().to_string(),
            config.cmdline.clone(),
            config.vcpus,
            config.mem_mib,
            config
                .disks
                .iter()
                .map(|d| (d.path.display().to_string(), d.read_only, d.id.clone()))
                .collect(),
        ));
        Err("mock launcher builds no VM".into())
    }

    fn restore(&self, options: vmm::RestoreOptions) -> Result<vmm::VmController, String> {
        self.0.lock().unwrap().restores.push((
            options.dir,
            options
                .nets
                .iter()
                .map(|n| n.as_ref().map(|n| n.tap.clone()))
                .collect(),
            options.vsock.and_then(|v| v.uds),
        ));
        Err("mock launcher restores no VM".into())
    }
}

fn vmm() -> (FcVmm, Arc<Mutex<Calls>>) {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let vmm = FcVmm::new(
        FcSettings::default(),
        Box::new(MockLauncher(Arc::clone(&calls))),
    )
    .unwrap();
    (vmm, calls)
}

/// A directory holding the files the bodies name: Firecracker (and so this layer) checks that a
/// kernel, initrd or drive file exists at the PUT. Fixed, so test runs do not leave new ones.
fn files() -> &'static str {
    static DIR: OnceLock<String> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join("dormouse-fc-api-test-files");
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "k",
            "i",
            "r",
            "r.ext4",
            "x",
            "y",
            "d",
            "vmlinux.bin",
            "bionic.rootfs.ext4",
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        dir.display().to_string()
    })
}

/// `@/name` in a body is the file `name` of [`files`].
fn with_files(body: &str) -> String {
    body.replace("@/", &format!("{}/", files()))
}

fn send(vmm: &FcVmm, method: &str, path: &str, body: &str) -> Response {
    router::route(
        vmm,
        &Request {
            method: method.into(),
            path: path.into(),
            body: with_files(body).into_bytes(),
        },
    )
}

fn fault_of(response: &Response) -> String {
    assert_eq!(response.status, 400, "expected a 400, got {response:?}");
    let body: Fault = serde_json::from_slice(response.body.as_deref().unwrap()).unwrap();
    body.fault_message
}

fn json_of(response: &Response) -> serde_json::Value {
    assert_eq!(response.status, 200, "expected a 200, got {response:?}");
    serde_json::from_slice(response.body.as_deref().unwrap()).unwrap()
}

#[test]
fn firecrackers_config_file_parses_and_maps_onto_a_vm_config() {
    // Its paths are relative to Firecracker's test directory; here they name the fixtures.
    let text = FC_VM_CONFIG_NETWORK
        .replace("\"vmlinux.bin\"", "\"@/vmlinux.bin\"")
        .replace("\"bionic.rootfs.ext4\"", "\"@/bionic.rootfs.ext4\"");
    let document: FullVmConfiguration = serde_json::from_str(&with_files(&text)).unwrap();
    assert!(document
        .boot_source
        .as_ref()
        .unwrap()
        .kernel_image_path
        .ends_with("/vmlinux.bin"));
    assert_eq!(document.drives.len(), 1);
    assert_eq!(document.network_interfaces[0].host_dev_name, "tap0");
    let (vmm, calls) = vmm();
    vmm.apply(document).unwrap();
    let message = fault_of(&send(
        &vmm,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    ));
    assert!(message.contains("mock launcher builds no VM"), "{message}");
    let calls = calls.lock().unwrap();
    let (kernel, cmdline, vcpus, mem, disks) = &calls.starts[0];
    assert_eq!(*kernel, with_files("@/vmlinux.bin"));
    assert_eq!(
        cmdline.as_deref(),
        Some("console=ttyS0 reboot=k panic=1 root=/dev/vda rw")
    );
    assert_eq!((*vcpus, *mem), (2, 1024));
    assert_eq!(
        disks,
        &vec![(
            with_files("@/bionic.rootfs.ext4"),
            false,
            Some("rootfs".to_string())
        )]
    );
}

#[test]
fn snapshot_bodies_from_firecrackers_docs_parse() {
    let create: SnapshotCreateParams = serde_json::from_str(
        r#"{"snapshot_type": "Diff", "snapshot_path": "./snapshot_file", "mem_file_path": "./mem_file"}"#,
    )
    .unwrap();
    assert_eq!(create.snapshot_type, SnapshotType::Diff);
    let full: SnapshotCreateParams =
        serde_json::from_str(r#"{"snapshot_path": "s", "mem_file_path": "m"}"#).unwrap();
    assert_eq!(full.snapshot_type, SnapshotType::Full);
    let load: SnapshotLoadParams = serde_json::from_str(
        r#"{"snapshot_path": "./snapshot_file",
            "mem_backend": {"backend_path": "./mem_file", "backend_type": "File"},
            "track_dirty_pages": true, "resume_vm": false}"#,
    )
    .unwrap();
    assert_eq!(
        load.mem_backend.unwrap().backend_type,
        MemoryBackendType::File
    );
    let legacy: SnapshotLoadParams = serde_json::from_str(
        r#"{"snapshot_path": "./snapshot_file", "mem_file_path": "./mem_file",
            "enable_diff_snapshots": true, "resume_vm": false}"#,
    )
    .unwrap();
    assert_eq!(legacy.mem_file_path.as_deref(), Some("./mem_file"));
}

#[test]
fn getting_started_sequence_is_accepted_before_boot() {
    // The bodies of Firecracker's docs/getting-started.md.
    let (vmm, _) = vmm();
    let steps = [
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "@/k", "boot_args": "console=ttyS0 reboot=k panic=1"}"#,
        ),
        (
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "@/r.ext4", "is_root_device": true, "is_read_only": false}"#,
        ),
        (
            "PUT",
            "/network-interfaces/net1",
            r#"{"iface_id": "net1", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}"#,
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 1024, "smt": false}"#,
        ),
        ("PATCH", "/machine-config", r#"{"mem_size_mib": 512}"#),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#,
        ),
    ];
    for (method, path, body) in steps {
        let response = send(&vmm, method, path, body);
        assert_eq!(response.status, 204, "{method} {path}: {response:?}");
    }
    let config = json_of(&send(&vmm, "GET", "/vm/config", ""));
    assert_eq!(config["machine-config"]["mem_size_mib"], 512);
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    assert_eq!(config["drives"][0]["drive_id"], "rootfs");
    assert_eq!(config["vsock"]["guest_cid"], 3);
    let info = json_of(&send(&vmm, "GET", "/", ""));
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "anonymous-instance");
    let version = json_of(&send(&vmm, "GET", "/version", ""));
    assert_eq!(version["firecracker_version"], FIRECRACKER_VERSION);
}

#[test]
fn fields_dormouse_cannot_honour_are_refused_with_a_reason() {
    let (vmm, _) = vmm();
    let cases = [
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": true}"#,
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 256, "cpu_template": "T2"}"#,
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 256, "huge_pages": "2M"}"#,
        ),
        (
            "PUT",
            "/drives/d",
            r#"{"drive_id": "d", "path_on_host": "@/x", "is_root_device": false, "io_engine": "Async"}"#,
        ),
        (
            "PUT",
            "/drives/d",
            r#"{"drive_id": "d", "is_root_device": false, "socket": "/vhost.sock"}"#,
        ),
        (
            "PUT",
            "/network-interfaces/e",
            r#"{"iface_id": "e", "host_dev_name": "tap0", "mtu": 9000}"#,
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 1, "deflate_on_oom": false, "free_page_hinting": true}"#,
        ),
    ];
    for (method, path, body) in cases {
        let message = fault_of(&send(&vmm, method, path, body));
        assert!(
            message.contains("not supported by dormouse"),
            "{method} {path}: {message}"
        );
    }
    // None of them changed the configuration.
    let config = json_of(&send(&vmm, "GET", "/vm/config", ""));
    assert_eq!(config["machine-config"]["vcpu_count"], 1);
    assert_eq!(config["drives"], serde_json::json!([]));
}

#[test]
fn malformed_requests_get_firecrackers_errors() {
    let (vmm, _) = vmm();
    // Firecracker opens the kernel and drive files at the PUT.
    let missing = fault_of(&send(
        &vmm,
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "@/missing"}"#,
    ));
    assert!(
        missing.starts_with("The kernel file cannot be opened"),
        "{missing}"
    );
    let missing = fault_of(&send(
        &vmm,
        "PUT",
        "/drives/a",
        r#"{"drive_id": "a", "path_on_host": "@/missing", "is_root_device": false}"#,
    ));
    assert!(missing.contains("cannot open its file"), "{missing}");
    let unknown_field = fault_of(&send(
        &vmm,
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "@/k", "bogus": 1}"#,
    ));
    assert!(
        unknown_field.starts_with(
            "An error occurred when deserializing the json body of a request: unknown field `bogus`"
        ),
        "{unknown_field}"
    );
    assert_eq!(
        fault_of(&send(
            &vmm,
            "PUT",
            "/drives/a-b",
            r#"{"drive_id": "a-b", "path_on_host": "@/x", "is_root_device": false}"#
        )),
        "API Resource IDs can only contain alphanumeric characters and underscores."
    );
    assert_eq!(
        fault_of(&send(&vmm, "PUT", "/boot-source", "")),
        "Empty PUT request."
    );
    assert_eq!(
        fault_of(&send(&vmm, "PATCH", "/machine-config", " ")),
        "Empty PATCH request."
    );
    assert_eq!(
        fault_of(&send(&vmm, "GET", "/", "{}")),
        "GET request cannot have a body."
    );
    assert_eq!(
        fault_of(&send(
            &vmm,
            "PUT",
            "/drives/a",
            r#"{"drive_id": "b", "path_on_host": "@/x", "is_root_device": false}"#
        )),
        "The id from the path does not match the id from the body!"
    );
    assert_eq!(
        fault_of(&send(&vmm, "DELETE", "/vm", "")),
        "Invalid request method and/or path: DELETE /vm."
    );
    assert_eq!(
        fault_of(&send(&vmm, "GET", "/drives/a/b", "")),
        "Invalid request method and/or path: GET /drives/a/b."
    );
    let big = format!(r#"{{"kernel_image_path": "{}"}}"#, "k".repeat(60_000));
    assert!(fault_of(&send(&vmm, "PUT", "/boot-source", &big))
        .contains("larger than the limit of 51200"));
    let second_root = r#"{"drive_id": "r2", "path_on_host": "@/y", "is_root_device": true}"#;
    assert_eq!(
        send(
            &vmm,
            "PUT",
            "/drives/r1",
            r#"{"drive_id": "r1", "path_on_host": "@/x", "is_root_device": true}"#
        )
        .status,
        204
    );
    assert_eq!(
        fault_of(&send(&vmm, "PUT", "/drives/r2", second_root)),
        "A root block device already exists!"
    );
}

#[test]
fn runtime_operations_before_boot_are_refused_as_firecracker_does() {
    let (vmm, calls) = vmm();
    for (method, path, body) in [
        ("PATCH", "/vm", r#"{"state": "Paused"}"#),
        (
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#,
        ),
        (
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#,
        ),
        ("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
    ] {
        assert_eq!(
            fault_of(&send(&vmm, method, path, body)),
            error::NOT_SUPPORTED_PRE_BOOT,
            "{method} {path}"
        );
    }
    assert_eq!(
        fault_of(&send(
            &vmm,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#
        )),
        "Cannot start microvm without kernel configuration."
    );
    assert!(calls.lock().unwrap().starts.is_empty());
    // dormouse's own routes on the same socket: no VM yet.
    let own = vmm_api::router::route(
        &vmm,
        &Request {
            method: "GET".into(),
            path: "/v1/vm".into(),
            body: Vec::new(),
        },
    );
    assert_eq!(own.status, 409, "{own:?}");
}

#[test]
fn snapshot_load_checks_its_paths_and_backend() {
    let (vmm, calls) = vmm();
    let uffd = r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/uffd.sock"}}"#;
    assert!(fault_of(&send(&vmm, "PUT", "/snapshot/load", uffd))
        .contains("mem_backend Uffd is not supported by dormouse"));
    let both = r#"{"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#;
    assert!(fault_of(&send(&vmm, "PUT", "/snapshot/load", both)).contains("not both"));
    let tmp = tempfile::tempdir().unwrap();
    let state_file = tmp.path().join("vm.snap");
    std::fs::write(&state_file, b"firecracker state").unwrap();
    let foreign = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state_file.display(),
        tmp.path().join("vm.mem").display()
    );
    assert!(fault_of(&send(&vmm, "PUT", "/snapshot/load", &foreign)).contains("not a directory"));
    // A directory whose memory.bin is not the memory file named.
    let dir = tmp.path().join("snap");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("memory.bin"), b"").unwrap();
    std::fs::write(tmp.path().join("other.mem"), b"").unwrap();
    let mismatched = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}}}"#,
        dir.display(),
        tmp.path().join("other.mem").display()
    );
    assert!(fault_of(&send(&vmm, "PUT", "/snapshot/load", &mismatched))
        .contains("checked against its state"));
    // The memory file itself, or a link to it, is accepted and reaches the launcher.
    std::fs::hard_link(dir.join("memory.bin"), tmp.path().join("vm.mem")).unwrap();
    let linked = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "resume_vm": true}}"#,
        dir.display(),
        tmp.path().join("vm.mem").display()
    );
    assert!(fault_of(&send(&vmm, "PUT", "/snapshot/load", &linked))
        .contains("mock launcher restores no VM"));
    assert_eq!(
        calls.lock().unwrap().restores,
        vec![(dir.clone(), Vec::new(), None)]
    );
    // Not after configuring boot resources.
    assert_eq!(
        send(
            &vmm,
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "@/k"}"#
        )
        .status,
        204
    );
    assert!(fault_of(&send(&vmm, "PUT", "/snapshot/load", &linked))
        .contains("not allowed after configuring"));
}

#[test]
fn a_read_only_root_with_partuuid_boots_as_firecracker_would() {
    let (vmm, calls) = vmm();
    send(
        &vmm,
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "@/k"}"#,
    );
    send(
        &vmm,
        "PUT",
        "/drives/data",
        r#"{"drive_id": "data", "path_on_host": "@/d", "is_root_device": false}"#,
    );
    let root = r#"{"drive_id": "root", "path_on_host": "@/r", "is_root_device": true, "is_read_only": true, "partuuid": "0eaa91a0-01"}"#;
    assert_eq!(send(&vmm, "PUT", "/drives/root", root).status, 204);
    send(
        &vmm,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    let calls = calls.lock().unwrap();
    let (_, cmdline, _, mem, disks) = &calls.starts[0];
    assert_eq!(*mem, 128, "Firecracker's default memory size");
    assert!(
        cmdline
            .as_deref()
            .unwrap()
            .ends_with(" root=PARTUUID=0eaa91a0-01 ro"),
        "{cmdline:?}"
    );
    // The root device is the first disk (/dev/vda) whatever the PUT order.
    assert_eq!(
        disks[0],
        (with_files("@/r"), true, Some("root".to_string()))
    );
    assert_eq!(disks[1].2.as_deref(), Some("data"));
}

/// Hostile bodies: every known-good body of this file, cut short and with bytes flipped, sent
/// to every path and method. The router answers each with 204 or 400 (never panics, never a
/// 200 to a write); a small LCG keeps it deterministic without a new dependency.
#[test]
fn mutated_bodies_on_every_route_get_an_answer() {
    let bodies: &[&str] = &[
        r#"{"kernel_image_path": "@/k", "boot_args": "console=ttyS0", "initrd_path": "@/i"}"#,
        r#"{"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": true}"#,
        r#"{"drive_id": "rootfs", "path_on_host": "@/r", "is_root_device": true, "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1, "one_time_burst": 5}}}"#,
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:c0:a8:00:02"}"#,
        r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#,
        r#"{"action_type": "InstanceStart"}"#,
        r#"{"state": "Paused"}"#,
        r#"{"snapshot_type": "Full", "snapshot_path": "/s", "mem_file_path": "/m"}"#,
        r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}]}"#,
        FC_VM_CONFIG_NETWORK,
    ];
    let routes = [
        ("PUT", "/boot-source"),
        ("PUT", "/machine-config"),
        ("PATCH", "/machine-config"),
        ("PUT", "/drives/rootfs"),
        ("PATCH", "/drives/rootfs"),
        ("PUT", "/network-interfaces/eth0"),
        ("PATCH", "/network-interfaces/eth0"),
        ("PUT", "/vsock"),
        ("PUT", "/actions"),
        ("PATCH", "/vm"),
        ("PUT", "/snapshot/create"),
        ("PUT", "/snapshot/load"),
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        seed >> 33
    };
    let (vmm, _) = vmm();
    let mut answered = 0;
    for body in bodies {
        for _ in 0..40 {
            let mut bytes = with_files(body).into_bytes();
            let cut = (next() as usize) % (bytes.len() + 1);
            bytes.truncate(cut.max(1));
            for _ in 0..(next() % 4) {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            for (method, path) in routes {
                let response = router::route(
                    &vmm,
                    &Request {
                        method: method.into(),
                        path: path.into(),
                        body: bytes.clone(),
                    },
                );
                assert!(
                    matches!(response.status, 204 | 400),
                    "{method} {path} {:?}: {response:?}",
                    String::from_utf8_lossy(&bytes)
                );
                answered += 1;
            }
        }
    }
    assert_eq!(answered, bodies.len() * 40 * routes.len());
}

#[test]
fn load_overrides_reach_the_restore_by_firecracker_id() {
    let (vmm, calls) = vmm();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("memory.bin"), b"").unwrap();
    // What /snapshot/create records beside dormouse's files.
    std::fs::write(
        dir.join(IDS_FILE),
        r#"{"drives": ["rootfs"], "nets": ["eth0", "eth1"]}"#,
    )
    .unwrap();
    let load = |overrides: &str| {
        format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "network_overrides": {overrides},
                "vsock_override": {{"uds_path": "/run/v2.sock"}}}}"#,
            dir.display(),
            dir.join("memory.bin").display()
        )
    };
    let unknown = load(r#"[{"iface_id": "eth7", "host_dev_name": "tap7"}]"#);
    assert!(
        fault_of(&send(&vmm, "PUT", "/snapshot/load", &unknown)).contains("no interface \"eth7\"")
    );
    assert!(
        calls.lock().unwrap().restores.is_empty(),
        "refused before the restore"
    );
    let second = load(r#"[{"iface_id": "eth1", "host_dev_name": "tap9"}]"#);
    assert!(fault_of(&send(&vmm, "PUT", "/snapshot/load", &second))
        .contains("mock launcher restores no VM"));
    assert_eq!(
        calls.lock().unwrap().restores,
        vec![(
            dir.clone(),
            vec![None, Some("tap9".to_string())],
            Some("/run/v2.sock".into())
        )]
    );
}

#[test]
fn metrics_file_is_configured_once_before_boot_and_gets_json_lines() {
    let (vmm, _) = vmm();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.json");
    // Before boot there is nothing to flush (Firecracker's pre-boot error).
    let early = fault_of(&send(
        &vmm,
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
    ));
    assert_eq!(early, crate::error::NOT_SUPPORTED_PRE_BOOT);
    // No file yet: the periodic flush writes nothing and fails nothing.
    vmm.flush_metrics_if_configured().unwrap();

    let body = format!(r#"{{"metrics_path": "{}"}}"#, path.display());
    assert_eq!(send(&vmm, "PUT", "/metrics", &body).status, 204);
    let again = fault_of(&send(&vmm, "PUT", "/metrics", &body));
    assert_eq!(again, crate::metrics_file::ALREADY_INITIALIZED);
    let unknown = fault_of(&send(
        &vmm,
        "PUT",
        "/metrics",
        r#"{"metrics_path": "/x", "bogus": 1}"#,
    ));
    assert!(unknown.contains("unknown field"), "{unknown}");

    // One line per flush, each with the groups; counters as changes since the last line.
    vmm.flush_metrics_if_configured().unwrap();
    vmm.metrics().vcpu().exit_hlt.inc();
    vmm.flush_metrics_if_configured().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for line in &lines {
        for group in ["utc_timestamp_ms", "vcpu", "api_server", "latencies_us"] {
            assert!(line.get(group).is_some(), "{group} missing: {line}");
        }
    }
    assert_eq!(lines[0]["vcpu"]["exit_hlt"], 0);
    assert_eq!(lines[1]["vcpu"]["exit_hlt"], 1);
}

#[test]
fn a_metrics_path_that_cannot_be_opened_is_a_400() {
    let (vmm, _) = vmm();
    let message = fault_of(&send(
        &vmm,
        "PUT",
        "/metrics",
        r#"{"metrics_path": "/nonexistent-dir/metrics"}"#,
    ));
    assert!(
        message.starts_with("Cannot open the metrics file"),
        "{message}"
    );
    // A failed PUT configured nothing: a good one still works.
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        r#"{{"metrics_path": "{}"}}"#,
        dir.path().join("m").display()
    );
    assert_eq!(send(&vmm, "PUT", "/metrics", &body).status, 204);
}

/// Records what `PUT /logger` asked for; refuses a level named "refuse".
struct MockLog(Arc<Mutex<Vec<crate::types::Logger>>>);

impl crate::LogControl for MockLog {
    fn configure(&self, logger: &crate::types::Logger) -> Result<(), String> {
        if logger.level.as_deref() == Some("refuse") {
            return Err("level refused".into());
        }
        self.0.lock().unwrap().push(logger.clone());
        Ok(())
    }
}

#[test]
fn put_logger_reaches_the_log_control_before_boot() {
    let (plain, _) = vmm();
    // Without a log control (an embedder's own logging) the reason is given.
    let message = fault_of(&send(&plain, "PUT", "/logger", r#"{"level": "Debug"}"#));
    assert!(message.contains("not supported by dormouse"), "{message}");

    let seen = Arc::new(Mutex::new(Vec::new()));
    let vmm = vmm()
        .0
        .with_log_control(Box::new(MockLog(Arc::clone(&seen))));
    let body = r#"{"level": "Warning", "show_level": true, "show_log_origin": false, "module": "vmm::vm", "log_path": "/tmp/l"}"#;
    assert_eq!(send(&vmm, "PUT", "/logger", body).status, 204);
    let got = seen.lock().unwrap().pop().unwrap();
    assert_eq!(got.level.as_deref(), Some("Warning"));
    assert_eq!(got.module.as_deref(), Some("vmm::vm"));
    assert_eq!(got.log_path.as_deref(), Some("/tmp/l"));
    assert_eq!(got.show_level, Some(true));
    let refused = fault_of(&send(&vmm, "PUT", "/logger", r#"{"level": "refuse"}"#));
    assert_eq!(refused, "level refused");
    let unknown = fault_of(&send(&vmm, "PUT", "/logger", r#"{"colour": true}"#));
    assert!(unknown.contains("unknown field"), "{unknown}");

    // A --config-file's logger and metrics sections are the same two PUTs.
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.json");
    let document: crate::types::FullVmConfiguration = serde_json::from_value(serde_json::json!({
        "logger": {"level": "Info"},
        "metrics": {"metrics_path": metrics},
    }))
    .unwrap();
    vmm.apply(document).unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
    vmm.flush_metrics_if_configured().unwrap();
    assert!(std::fs::read_to_string(&metrics)
        .unwrap()
        .contains("utc_timestamp_ms"));
}

#[test]
fn the_balloon_is_configured_before_boot_and_changed_after() {
    let (vmm, calls) = vmm();
    assert!(fault_of(&send(&vmm, "GET", "/balloon", "")).contains("No balloon"));
    let body = r#"{"amount_mib": 4096, "deflate_on_oom": true, "stats_polling_interval_s": 1,
                   "free_page_reporting": true}"#;
    assert_eq!(send(&vmm, "PUT", "/balloon", body).status, 204);
    let got = json_of(&send(&vmm, "GET", "/balloon", ""));
    assert_eq!(got["amount_mib"], 4096);
    assert_eq!(got["free_page_reporting"], true);
    let config = json_of(&send(&vmm, "GET", "/vm/config", ""));
    assert_eq!(config["balloon"]["stats_polling_interval_s"], 1);
    for (method, path, body) in [
        ("PATCH", "/balloon", r#"{"amount_mib": 1}"#),
        ("GET", "/balloon/statistics", ""),
        (
            "PATCH",
            "/balloon/statistics",
            r#"{"stats_polling_interval_s": 2}"#,
        ),
    ] {
        assert_eq!(
            fault_of(&send(&vmm, method, path, body)),
            error::NOT_SUPPORTED_PRE_BOOT,
            "{method} {path}"
        );
    }
    // More than the VM's memory (128 MiB by default) cannot start.
    let boot = r#"{"kernel_image_path": "@/k"}"#;
    assert_eq!(send(&vmm, "PUT", "/boot-source", boot).status, 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert!(fault_of(&send(&vmm, "PUT", "/actions", start)).contains("larger than"));
    assert!(calls.lock().unwrap().starts.is_empty());
    let fits = r#"{"amount_mib": 16, "deflate_on_oom": false}"#;
    assert_eq!(send(&vmm, "PUT", "/balloon", fits).status, 204);
    assert!(fault_of(&send(&vmm, "PUT", "/actions", start)).contains("mock launcher"));
    assert_eq!(calls.lock().unwrap().starts.len(), 1);
}

fn put_two_interfaces(vmm: &FcVmm) {
    for (id, tap) in [("eth0", "tap0"), ("eth1", "tap1")] {
        let body = format!(r#"{{"iface_id": "{id}", "host_dev_name": "{tap}"}}"#);
        let path = format!("/network-interfaces/{id}");
        assert_eq!(send(vmm, "PUT", &path, &body).status, 204);
    }
}

#[test]
fn mmds_put_patch_get() {
    let (vmm, _) = vmm();
    assert_eq!(
        json_of(&send(&vmm, "GET", "/mmds", "")),
        serde_json::json!({})
    );
    let message = fault_of(&send(&vmm, "PATCH", "/mmds", r#"{"a": 1}"#));
    assert!(message.contains("not initialized"), "{message}");
    let put = r#"{"latest": {"meta-data": {"ami-id": "ami-1", "old": "x"}}}"#;
    assert_eq!(send(&vmm, "PUT", "/mmds", put).status, 204);
    let patch = r#"{"latest": {"meta-data": {"old": null, "new": "y"}}}"#;
    assert_eq!(send(&vmm, "PATCH", "/mmds", patch).status, 204);
    assert_eq!(
        json_of(&send(&vmm, "GET", "/mmds", "")),
        serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-1", "new": "y"}}})
    );
    assert!(fault_of(&send(&vmm, "PUT", "/mmds", "[1, 2]")).contains("JSON object"));
    assert!(fault_of(&send(&vmm, "PUT", "/mmds", "{")).contains("deserializing"));
}

#[test]
fn mmds_over_the_size_limit_is_refused() {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let settings = FcSettings {
        mmds_size_limit: 64,
        ..FcSettings::default()
    };
    let vmm = FcVmm::new(settings, Box::new(MockLauncher(calls))).unwrap();
    let small = r#"{"a": "0123456789"}"#;
    assert_eq!(send(&vmm, "PUT", "/mmds", small).status, 204);
    let big = format!(r#"{{"a": "{}"}}"#, "x".repeat(100));
    let message = fault_of(&send(&vmm, "PUT", "/mmds", &big));
    assert!(message.contains("doesn't fit"), "{message}");
    let message = fault_of(&send(&vmm, "PATCH", "/mmds", &big));
    assert!(message.contains("doesn't fit"), "{message}");
    assert_eq!(
        json_of(&send(&vmm, "GET", "/mmds", "")),
        serde_json::json!({"a": "0123456789"})
    );
}

#[test]
fn mmds_config_is_checked_and_reaches_the_named_interfaces() {
    let (vmm, calls) = vmm();
    put_two_interfaces(&vmm);
    let cases = [
        (r#"{"network_interfaces": []}"#, "is empty"),
        (r#"{"network_interfaces": ["eth9"]}"#, "does not correspond"),
        (
            r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#,
            "not link local",
        ),
        (
            r#"{"network_interfaces": ["eth0"], "ipv4_address": "169.254.0.1"}"#,
            "not link local",
        ),
        (
            r#"{"network_interfaces": ["eth0"], "ipv4_address": "nope"}"#,
            "Invalid MMDS IPv4",
        ),
        (
            r#"{"network_interfaces": ["eth0"], "version": "V3"}"#,
            "deserializing",
        ),
    ];
    for (body, expected) in cases {
        let message = fault_of(&send(&vmm, "PUT", "/mmds/config", body));
        assert!(message.contains(expected), "{body}: {message}");
    }
    let good =
        r#"{"network_interfaces": ["eth1"], "version": "V2", "ipv4_address": "169.254.170.2"}"#;
    assert_eq!(send(&vmm, "PUT", "/mmds/config", good).status, 204);
    let config = json_of(&send(&vmm, "GET", "/vm/config", ""));
    assert_eq!(config["mmds-config"]["version"], "V2");
    let boot = r#"{"kernel_image_path": "@/k"}"#;
    assert_eq!(send(&vmm, "PUT", "/boot-source", boot).status, 204);
    fault_of(&send(
        &vmm,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    ));
    let ip: std::net::Ipv4Addr = "169.254.170.2".parse().unwrap();
    assert_eq!(calls.lock().unwrap().mmds, vec![vec![None, Some(ip)]]);
}

#[test]
fn mmds_config_in_a_config_file_applies_after_the_interfaces() {
    let (vmm, calls) = vmm();
    let text = FC_VM_CONFIG_NETWORK
        .replace("\"vmlinux.bin\"", "\"@/vmlinux.bin\"")
        .replace("\"bionic.rootfs.ext4\"", "\"@/bionic.rootfs.ext4\"")
        .replace(
            "\"mmds-config\": null",
            r#""mmds-config": {"network_interfaces": ["eth0"], "version": "V2"}"#,
        );
    let document: FullVmConfiguration = serde_json::from_str(&with_files(&text)).unwrap();
    vmm.apply(document).unwrap();
    fault_of(&send(
        &vmm,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    ));
    assert_eq!(
        calls.lock().unwrap().mmds,
        vec![vec![Some(devices::mmds::DEFAULT_IPV4)]]
    );
}
