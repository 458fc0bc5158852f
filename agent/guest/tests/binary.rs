//! The `dormouse-agent` binary, run as a normal (non-init) process.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent::proto::ShutdownAction;
use agent_client::{AgentClient, ExecCommand, ExecEvent};

struct Running {
    child: std::process::Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn start_agent() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_dormouse-agent"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--no-ready")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Running {
        child,
        socket,
        _dir: dir,
    }
}

async fn connect(socket: &std::path::Path) -> AgentClient {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match AgentClient::connect_unix(socket).await {
            Ok(client) => return client,
            Err(err) if Instant::now() > deadline => panic!("agent never came up: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Polls without blocking the runtime: the client's connection task must
/// keep running so the agent can close it gracefully.
async fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "agent did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn binary_serves_and_shuts_down() {
    let mut agent = start_agent();
    let client = connect(&agent.socket).await;
    assert_eq!(
        client.ping().await.unwrap().version,
        env!("CARGO_PKG_VERSION")
    );
    let output = client
        .exec(&ExecCommand::shell("echo $((6 * 7))"))
        .await
        .unwrap();
    assert_eq!(output.stdout, b"42\n");
    client.shutdown(ShutdownAction::PowerOff).await.unwrap();
    // Graceful: well before the 2 s forced-stop grace period.
    let status = wait_exit(&mut agent.child, Duration::from_millis(1500)).await;
    assert!(status.success());
}

#[tokio::test]
async fn sigterm_is_forwarded_to_children() {
    let mut agent = start_agent();
    let client = connect(&agent.socket).await;
    let mut session = client
        .exec_stream(&ExecCommand::shell(
            "trap 'echo got-term; exit 0' TERM; echo armed; while :; do sleep 0.05; done",
        ))
        .await
        .unwrap();
    assert_eq!(
        session.next_event().await.unwrap(),
        Some(ExecEvent::Stdout(b"armed\n".to_vec()))
    );
    // SAFETY: signalling the agent child we spawned.
    let agent_pid = agent.child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(agent_pid, libc::SIGTERM) }, 0);
    let output = session.wait().await.unwrap();
    assert_eq!(output.stdout, b"got-term\n");
    assert!(output.success());
    assert!(wait_exit(&mut agent.child, Duration::from_secs(10))
        .await
        .success());
}

#[test]
fn version_and_bad_arguments() {
    let version = Command::new(env!("CARGO_BIN_EXE_dormouse-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8(version.stdout).unwrap(),
        format!("dormouse-agent {}\n", env!("CARGO_PKG_VERSION"))
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_dormouse-agent"))
        .args(["--listen", "carrier-pigeon:1"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
