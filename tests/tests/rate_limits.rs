//! Rate limits end to end on the CLI VMM (the idle tiny guest: no Linux boot), with seccomp
//! enforcing (the default): limits given on `run`, changed through `dormouse ctl limit-disk`
//! while the VM runs (applied on the device thread) and while it is paused (applied on the API
//! thread), refused for a disk the VM does not have, and kept in a snapshot's state. Speed is
//! measured in `dormouse bench io`, not here.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use devices::rate_limiter::TokenBucketConfig;
use tests::*;
use vmm::device_manager::SavedDevice;
use vmm::tiny_guest::{self, TinyGuestEnd};
use vmm::vm::VmSnapshotState;

fn ctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(dormouse_bin())
        .arg("ctl")
        .arg("--sock")
        .arg(sock)
        .args(args)
        .output()
        .expect("dormouse ctl")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The body of `GET /metrics`.
fn prometheus_text(sock: &Path) -> String {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(sock).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

#[test]
fn disk_limits_change_at_runtime_and_are_saved() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny-idle.elf");
    tiny_guest::write_portable_to(&kernel, TinyGuestEnd::Idle).unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("api.sock");
    let child = Command::new(dormouse_bin())
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--mem-mib", "16", "--console", "null", "--disk"])
        .arg(format!("path={},bw=1M/100", disk.display()))
        .arg("--api-sock")
        .arg(&sock)
        .args(["--id", "rl-e2e"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning dormouse");
    // The socket is bound before the VM runs.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Running: applied on the device thread.
    let now = ok(
        &ctl(&sock, &["limit-disk", "0", "--bw", "2M/100"]),
        "limit-disk",
    );
    assert!(now.contains("2097152"), "{now}");
    // Paused: applied on the API thread (its seccomp filter must allow it).
    ok(&ctl(&sock, &["pause"]), "pause");
    let now = ok(
        &ctl(&sock, &["limit-disk", "0", "--ops", "100/1000"]),
        "limit-disk while paused",
    );
    assert!(now.contains("2097152") && now.contains("100"), "{now}");
    ok(&ctl(&sock, &["resume"]), "resume");
    // A disk the VM does not have: a clear error, the VM unharmed.
    let missing = ctl(&sock, &["limit-disk", "5", "--bw", "off"]);
    assert!(!missing.status.success());
    let message = String::from_utf8_lossy(&missing.stderr);
    assert!(message.contains("no disk 5"), "{message}");

    let snap = dir.path().join("snap");
    ok(
        &ctl(&sock, &["snapshot", "--dir", snap.to_str().unwrap()]),
        "snapshot",
    );
    // The snapshot and the disk (unread by this guest) on the Prometheus endpoint, labelled
    // with --id.
    let text = prometheus_text(&sock);
    assert!(
        text.contains(r#"dormouse_snapshot_creates_total{kind="full",vm_id="rl-e2e"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"dormouse_block_read_bytes_total{device="vda",vm_id="rl-e2e"} 0"#),
        "{text}"
    );
    ok(&ctl(&sock, &["shutdown"]), "shutdown");
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "the VMM did not exit cleanly (159 would be a seccomp kill): {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let state: VmSnapshotState = snapshot::read_state(&snap).unwrap();
    let limits = state
        .devices
        .virtio
        .iter()
        .find_map(|d| match &d.device {
            SavedDevice::Block(b) => Some(b.rate_limiter),
            _ => None,
        })
        .expect("the disk is in the snapshot");
    assert_eq!(
        limits.bandwidth,
        Some(TokenBucketConfig {
            size: 2 << 20,
            one_time_burst: None,
            refill_time: 100
        })
    );
    assert_eq!(
        limits.ops.map(|o| (o.size, o.refill_time)),
        Some((100, 1000))
    );
}
