//! Detached exec sessions (ExecStart/List/Attach/Kill/Wait) against an in-process agent.

mod common;

use std::time::Duration;

use agent_client::{
    AttachEvent, ExecAttachment, ExecCommand, ExecSessionId, ExecSessionState, ExitOutcome,
    OutputStream, SESSION_OUTPUT_BYTES,
};
use common::{wait_gone, TestAgent};
use tonic::Code;

/// Reads events until stdout holds `needle` (or the exit); returns stdout so far.
async fn read_until(attachment: &mut ExecAttachment, needle: &str) -> String {
    let mut stdout = String::new();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while !stdout.contains(needle) {
            match attachment.next_event().await.unwrap() {
                Some(AttachEvent::Stdout(data)) => stdout.push_str(&String::from_utf8_lossy(&data)),
                Some(AttachEvent::Exit { .. }) | None => return false,
                Some(_) => {}
            }
        }
        true
    })
    .await;
    assert_eq!(found, Ok(true), "no {needle:?} in {stdout:?}");
    stdout
}

async fn wait_exited(agent: &TestAgent, id: &ExecSessionId) {
    tokio::time::timeout(Duration::from_secs(10), agent.client.exec_wait(id))
        .await
        .expect("session did not exit")
        .unwrap();
}

#[tokio::test]
async fn sessions_outlive_their_caller() {
    let agent = TestAgent::start().await;
    let client = &agent.client;
    let counter = client
        .exec_start(
            &ExecCommand::shell("echo one; echo err >&2; echo two; exec sleep 30"),
            false,
        )
        .await
        .unwrap();
    let short = client
        .exec_start(&ExecCommand::shell("echo done; exit 7"), false)
        .await
        .unwrap();
    assert_ne!(counter.id, short.id);

    // The short one finishes with nobody attached; its status is there after the fact.
    assert_eq!(
        client.exec_wait(&short.id).await.unwrap(),
        ExecSessionState::Exited {
            status: ExitOutcome::Code(7),
            timed_out: false
        }
    );
    let listed = client.exec_list().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].id, counter.id, "oldest first");
    assert_eq!(listed[0].pid, counter.pid);
    assert_eq!(listed[0].state, ExecSessionState::Running);
    assert!(listed[0].command.starts_with("echo one"), "{listed:?}");
    assert_eq!(listed[1].id, short.id);
    assert!(matches!(
        listed[1].state,
        ExecSessionState::Exited {
            status: ExitOutcome::Code(7),
            ..
        }
    ));

    // A late attacher gets the earlier output, in order, then the exit.
    let output = client
        .exec_attach(&short.id)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(output.stdout, b"done\n");
    assert_eq!(output.exit_code(), Some(7));

    let mut attachment = client.exec_attach(&counter.id).await.unwrap();
    assert_eq!(attachment.pid(), counter.pid);
    // (Each stream's order is kept; a pipe read may join two writes.)
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    tokio::time::timeout(Duration::from_secs(10), async {
        while stdout != b"one\ntwo\n" || stderr != b"err\n" {
            match attachment.next_event().await.unwrap().unwrap() {
                AttachEvent::Stdout(data) => stdout.extend(data),
                AttachEvent::Stderr(data) => stderr.extend(data),
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("replayed output");
    // Detaching leaves it running; a probe says so.
    drop(attachment);
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.exec_kill(&counter.id, 0).await.unwrap();
    assert_eq!(client.ping().await.unwrap().running_processes, 1);

    // Killed by id: a second attacher sees the replay and the exit.
    let second = client.exec_attach(&counter.id).await.unwrap();
    client.exec_kill(&counter.id, libc::SIGKILL).await.unwrap();
    let output = second.wait().await.unwrap();
    assert_eq!(output.stdout, b"one\ntwo\n");
    assert_eq!(output.stderr, b"err\n");
    assert_eq!(output.signal(), Some(libc::SIGKILL));
    assert!(wait_gone(counter.pid, Duration::from_secs(5)).await);
    let exited = client.exec_kill(&counter.id, 0).await.unwrap_err();
    assert_eq!(exited.code(), Some(Code::FailedPrecondition), "{exited}");
}

#[tokio::test]
async fn attached_stdin_and_signals_reach_the_process() {
    let agent = TestAgent::start().await;
    let client = &agent.client;
    let started = client
        .exec_start(&ExecCommand::new("cat").stdin(b"first\n".to_vec()), true)
        .await
        .unwrap();
    let mut attachment = client.exec_attach(&started.id).await.unwrap();
    read_until(&mut attachment, "first\n").await;
    attachment.write_stdin(b"second\n".to_vec()).await.unwrap();
    read_until(&mut attachment, "second\n").await;
    // Another attacher may write too, and sees everything so far.
    let mut other = client.exec_attach(&started.id).await.unwrap();
    other.write_stdin(b"third\n".to_vec()).await.unwrap();
    read_until(&mut other, "first\nsecond\nthird\n").await;
    other.close_stdin().await.unwrap();
    let output = attachment.wait().await.unwrap();
    assert_eq!(output.stdout, b"third\n", "the rest after what was read");
    assert!(output.success());

    let sleeper = client
        .exec_start(&ExecCommand::new("sleep").arg("30"), false)
        .await
        .unwrap();
    let attachment = client.exec_attach(&sleeper.id).await.unwrap();
    attachment.signal(libc::SIGTERM).await.unwrap();
    assert_eq!(
        attachment.wait().await.unwrap().signal(),
        Some(libc::SIGTERM)
    );

    // Without keep_stdin_open, stdin is closed after the given bytes.
    let closed = client
        .exec_start(&ExecCommand::new("cat").stdin(b"x".to_vec()), false)
        .await
        .unwrap();
    wait_exited(&agent, &closed.id).await;
    let output = client
        .exec_attach(&closed.id)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(output.stdout, b"x");
}

#[tokio::test]
async fn the_ring_keeps_the_newest_output_and_says_what_it_dropped() {
    let agent = TestAgent::start().await;
    let client = &agent.client;
    let extra = 100_000;
    let total = SESSION_OUTPUT_BYTES + extra;
    let started = client
        .exec_start(
            &ExecCommand::shell(format!(
                "head -c {total} /dev/zero | tr '\\0' a; echo end >&2"
            )),
            false,
        )
        .await
        .unwrap();
    wait_exited(&agent, &started.id).await;
    let mut attachment = client.exec_attach(&started.id).await.unwrap();
    assert_eq!(
        attachment.next_event().await.unwrap(),
        Some(AttachEvent::Dropped {
            stream: OutputStream::Stdout,
            bytes: extra as u64
        })
    );
    let output = attachment.wait().await.unwrap();
    assert_eq!(output.stdout.len(), SESSION_OUTPUT_BYTES);
    assert!(output.stdout.iter().all(|b| *b == b'a'));
    assert_eq!(output.stderr, b"end\n");
    // `wait` marks the loss too.
    let output = client
        .exec_attach(&started.id)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert!(output.stdout_truncated && !output.stderr_truncated);
}

#[tokio::test]
async fn session_misuse_returns_grpc_errors() {
    let agent = TestAgent::start().await;
    let client = &agent.client;
    let unknown: ExecSessionId = "0123456789abcdef0123456789abcdef".parse().unwrap();
    let err = client.exec_attach(&unknown).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    assert_eq!(
        client.exec_wait(&unknown).await.unwrap_err().code(),
        Some(Code::NotFound)
    );
    assert_eq!(
        client.exec_kill(&unknown, 0).await.unwrap_err().code(),
        Some(Code::NotFound)
    );
    // A malformed id sent through the raw client.
    let err = client
        .grpc()
        .exec_wait(agent_client::proto::ExecWaitRequest {
            session_id: "../x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .exec_start(&ExecCommand::new("/no/such/binary"), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    // Exec and ExecStream processes are not sessions.
    assert!(client
        .exec(&ExecCommand::new("true"))
        .await
        .unwrap()
        .success());
    let _stream = client.exec_stream(&ExecCommand::new("cat")).await.unwrap();
    assert!(client.exec_list().await.unwrap().is_empty());
}
