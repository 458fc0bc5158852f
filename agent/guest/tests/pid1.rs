//! The binary as PID 1 inside fresh PID/mount/UTS/net namespaces
//! (`unshare`), which is as close to the guest as the host gets: it mounts
//! the pseudo file systems, sets the hostname, reaps orphans and powers off
//! (in a PID namespace, reboot(2) just ends the namespace's init).
//!
//! Ignored by default: needs root and util-linux `unshare`. Run with
//! `cargo test -p agent --test pid1 -- --ignored`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent::proto::ShutdownAction;
use agent_client::{AgentClient, ExecCommand};

#[tokio::test]
#[ignore = "needs root and unshare(1)"]
async fn runs_as_pid1_in_namespaces() {
    // Not under /tmp: the agent mounts a fresh tmpfs there.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let socket = dir.path().join("agent.sock");
    let mut child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--net",
            "--propagation",
            "private",
        ])
        .arg(env!("CARGO_BIN_EXE_dormouse-agent"))
        .args(["--no-ready", "--hostname", "sandbox", "--listen"])
        .arg(format!("unix:{}", socket.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let client = loop {
        if let Ok(client) = AgentClient::connect_unix(&socket).await {
            break client;
        }
        assert!(Instant::now() < deadline, "agent did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(client.ping().await.unwrap().is_init);

    let run = |line: &str| ExecCommand::shell(line.to_owned());
    let hostname = client
        .exec(&run("cat /proc/sys/kernel/hostname"))
        .await
        .unwrap();
    assert_eq!(hostname.stdout, b"sandbox\n");
    let mounts = client
        .exec(&run("cat /proc/mounts"))
        .await
        .unwrap()
        .stdout_lossy();
    for target in [
        " /proc ",
        " /sys ",
        " /dev ",
        " /dev/pts ",
        " /tmp ",
        " /run ",
    ] {
        assert!(mounts.contains(target), "{target} not mounted:\n{mounts}");
    }
    let lo = client
        .exec(&run(
            "cat /sys/class/net/lo/operstate /sys/class/net/lo/flags",
        ))
        .await
        .unwrap();
    assert!(
        lo.stdout_lossy().contains("0x9"),
        "lo not up: {}",
        lo.stdout_lossy()
    );

    // Orphans (the backgrounded sleeps) are re-parented to PID 1 and reaped.
    let orphans = client
        .exec(&run("sleep 0.2 & sleep 0.2 & echo spawned"))
        .await
        .unwrap();
    assert_eq!(orphans.stdout, b"spawned\n");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let states = client
        .exec(&run("cat /proc/[0-9]*/stat 2>/dev/null | awk '{print $3}'"))
        .await
        .unwrap()
        .stdout_lossy();
    assert!(
        !states.lines().any(|state| state == "Z"),
        "zombies left: {states}"
    );

    client.shutdown(ShutdownAction::PowerOff).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "PID 1 did not power off");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
