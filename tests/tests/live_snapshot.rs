//! Live snapshots end to end (`ctl snapshot --live`): a guest that keeps writing every page of
//! its memory, pass after pass, and checks on each pass that every page holds the previous
//! pass's value (the `WriteForever` tiny guest). A live snapshot taken while it writes must
//! restore to a state where memory and registers agree: the restored guest keeps passing. A
//! memory file changed by one page makes it stop with `tiny-BAD` (the check can fail).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::*;
use vmm::tiny_guest::{self, TinyGuestEnd};

const MEM_MIB: u64 = 256;
/// A pass over 256 MiB takes well under a second even with the guest's code emulated.
const PASS_BOUND: Duration = Duration::from_secs(60);

fn spawn(args: &[&str]) -> Running {
    let mut cmd = Command::new(dormouse_bin());
    cmd.args(args);
    Running::spawn(cmd)
}

/// Waits for `n` more passes; panics on a `tiny-BAD` line.
fn passes(vm: &Running, n: usize) {
    writer_passes(n, PASS_BOUND, |bound| vm.recv(bound), || vm.console_tail());
}

fn snapshot(sock: &Path, dir: &Path) -> serde_json::Value {
    let (status, body) = api_request(
        sock,
        "PUT",
        "/v1/vm/snapshot",
        &format!(r#"{{"dir": "{}", "live": true}}"#, dir.display()),
    );
    assert!(status.contains(" 200 "), "{status}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn a_guest_writing_during_a_live_snapshot_restores_consistent() {
    if !require_kvm() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let kernel = tmp.path().join("write-forever.elf");
    tiny_guest::write_to(
        &kernel,
        TinyGuestEnd::WriteForever {
            mem_bytes: MEM_MIB << 20,
        },
    )
    .unwrap();
    let sock = tmp.path().join("vm.sock");
    let mem = MEM_MIB.to_string();
    let vm = spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--mem-mib",
        &mem,
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    wait_for_socket(&sock);
    passes(&vm, 2);

    // Live (through the CLI): the guest is paused only briefly and keeps writing while memory
    // is saved.
    let snap = tmp.path().join("live");
    let out = Command::new(dormouse_bin())
        .args([
            "ctl",
            "--sock",
            sock.to_str().unwrap(),
            "snapshot",
            "--live",
            "--dir",
        ])
        .arg(&snap)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("live snapshot: {info}");
    assert_eq!(info["live"], true, "{info}");
    assert!(info["live_unavailable"].is_null(), "{info}");
    let paused_us = info["paused_us"].as_u64().unwrap();
    assert!(paused_us > 0, "{info}");
    // Every page the guest wrote (all of them after two passes) is in the file.
    assert!(
        info["pages_written"].as_u64().unwrap() >= (MEM_MIB << 20) / 4096 - 1024,
        "{info}"
    );
    passes(&vm, 2);
    vm.kill();

    // Restored, the guest goes on from the snapshot's instant: its memory must match.
    let sock2 = tmp.path().join("restored.sock");
    let restored = spawn(&[
        "restore",
        "--dir",
        snap.to_str().unwrap(),
        "--api-sock",
        sock2.to_str().unwrap(),
    ]);
    wait_for_socket(&sock2);
    passes(&restored, 3);

    // A restored VM's memory is a private mapping of the snapshot file: no live snapshot,
    // and the answer says why.
    let again = snapshot(&sock2, &tmp.path().join("again"));
    assert_eq!(again["live"], false, "{again}");
    assert!(
        again["live_unavailable"]
            .as_str()
            .is_some_and(|r| r.contains("restored")),
        "{again}"
    );
    restored.kill();

    // The check can fail: one page with a value no pass wrote, and the guest says so.
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory.bin"))
        .unwrap();
    memory
        .write_all_at(&0xdead_beefu32.to_le_bytes(), 64 << 20)
        .unwrap();
    drop(memory);
    let sock3 = tmp.path().join("damaged.sock");
    let damaged = spawn(&[
        "restore",
        "--dir",
        snap.to_str().unwrap(),
        "--api-sock",
        sock3.to_str().unwrap(),
    ]);
    damaged.wait_for(WRITER_BAD, PASS_BOUND * 2);
}
