//! Exec, ExecStream and Kill against an in-process agent.

mod common;

use std::time::{Duration, Instant};

use agent::proto::{exec_stream_request, ExecStreamRequest};
use agent_client::{ExecCommand, ExecEvent, ExitOutcome};
use common::{wait_gone, TestAgent};
use tonic::Code;

#[tokio::test]
async fn exec_runs_a_command() {
    let agent = TestAgent::start().await;
    let output = agent
        .client
        .exec(&ExecCommand::new("echo").args(["hello", "world"]))
        .await
        .unwrap();
    assert_eq!(output.stdout, b"hello world\n");
    assert!(output.stderr.is_empty());
    assert!(output.success());
    assert!(output.pid > 0);
}

#[tokio::test]
async fn stderr_and_exit_codes_are_captured() {
    let agent = TestAgent::start().await;
    let output = agent
        .client
        .exec(&ExecCommand::shell("echo out; echo err >&2; exit 3"))
        .await
        .unwrap();
    assert_eq!(output.stdout, b"out\n");
    assert_eq!(output.stderr, b"err\n");
    assert_eq!(output.exit_code(), Some(3));

    let failed = agent.client.exec(&ExecCommand::new("false")).await.unwrap();
    assert_eq!(failed.status, ExitOutcome::Code(1));
    let high = agent
        .client
        .exec(&ExecCommand::shell("exit 255"))
        .await
        .unwrap();
    assert_eq!(high.exit_code(), Some(255));
    let signalled = agent
        .client
        .exec(&ExecCommand::shell("kill -TERM $$"))
        .await
        .unwrap();
    assert_eq!(signalled.signal(), Some(libc::SIGTERM));
}

#[tokio::test]
async fn ten_thousand_lines_arrive_complete_and_in_order() {
    let agent = TestAgent::start().await;
    let output = agent
        .client
        .exec(&ExecCommand::new("seq").args(["1", "10000"]))
        .await
        .unwrap();
    let text = output.stdout_lossy();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 10_000);
    for (index, line) in lines.iter().enumerate() {
        assert_eq!(line.parse::<usize>().unwrap(), index + 1);
    }

    // Interleaved stdout/stderr, 200k lines: each stream stays ordered.
    let output = agent
        .client
        .exec(&ExecCommand::shell(
            "i=0; while [ $i -lt 20000 ]; do echo o$i; echo e$i >&2; i=$((i+1)); done",
        ))
        .await
        .unwrap();
    let expected_out: String = (0..20000).map(|i| format!("o{i}\n")).collect();
    let expected_err: String = (0..20000).map(|i| format!("e{i}\n")).collect();
    assert_eq!(output.stdout_lossy(), expected_out);
    assert_eq!(output.stderr_lossy(), expected_err);
}

#[tokio::test]
async fn output_cap_truncates_but_process_finishes() {
    let agent = TestAgent::start().await;
    let output = agent
        .client
        .exec(
            &ExecCommand::new("seq")
                .args(["1", "100000"])
                .max_output_bytes(1000),
        )
        .await
        .unwrap();
    assert_eq!(output.stdout.len(), 1000);
    assert!(output.stdout_truncated);
    assert!(output.success());
}

#[tokio::test]
async fn environment_cwd_and_stdin() {
    let agent = TestAgent::start().await;
    let output = agent
        .client
        .exec(
            &ExecCommand::shell("echo \"$GREETING $OTHER\"")
                .env("GREETING", "hi there")
                .env("OTHER", "x=y"),
        )
        .await
        .unwrap();
    assert_eq!(output.stdout, b"hi there x=y\n");

    let cleared = agent
        .client
        .exec(&ExecCommand::new("env").clear_env().env("ONLY", "1"))
        .await
        .unwrap();
    let mut vars: Vec<String> = cleared.stdout_lossy().lines().map(str::to_owned).collect();
    vars.sort();
    assert_eq!(
        vars,
        ["ONLY=1", &format!("PATH={}", agent::server::DEFAULT_PATH)]
    );

    let dir = agent.dir_path().canonicalize().unwrap();
    let pwd = agent
        .client
        .exec(&ExecCommand::new("pwd").cwd(dir.to_str().unwrap()))
        .await
        .unwrap();
    assert_eq!(pwd.stdout_lossy().trim_end(), dir.to_str().unwrap());

    let input: Vec<u8> = (0..=255u8).cycle().take(3 * 1024 * 1024 + 7).collect();
    let echoed = agent
        .client
        .exec(&ExecCommand::new("cat").stdin(input.clone()))
        .await
        .unwrap();
    assert_eq!(echoed.stdout.len(), input.len());
    assert_eq!(echoed.stdout, input);
}

/// Children start as a shell would start them, whichever way the agent spawns them
/// (posix_spawn as itself, fork for another user): every signal at its default (std ignores
/// SIGPIPE in the agent), none blocked, a process group of their own, only fds 0-2 open.
#[tokio::test]
async fn children_start_with_default_signals_their_own_group_and_only_stdio() {
    let agent = TestAgent::start().await;
    // With SIGPIPE ignored, `yes` would see EPIPE and complain on stderr instead of dying.
    let out = agent
        .client
        .exec(&ExecCommand::shell("yes | head -n 1"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"y\n");
    assert!(out.stderr.is_empty(), "{}", out.stderr_lossy());
    let out = agent
        .client
        .exec(&ExecCommand::shell(
            "grep -E '^(SigBlk|SigIgn)' /proc/self/status; \
             [ \"$(cut -d' ' -f5 /proc/self/stat)\" = \"$$\" ] && echo own-group; \
             ls /proc/self/fd",
        ))
        .await
        .unwrap();
    let text = out.stdout_lossy();
    assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
    assert!(text.contains("SigIgn:\t0000000000000000"), "{text}");
    assert!(text.contains("own-group"), "{text}");
    // ls's own directory fd is the fourth; nothing of the agent's leaks.
    let fds: Vec<&str> = text
        .lines()
        .skip_while(|line| !line.chars().all(|c| c.is_ascii_digit()))
        .collect();
    assert_eq!(fds, ["0", "1", "2", "3"], "{text}");
}

#[tokio::test]
async fn shell_pipes() {
    let agent = TestAgent::start().await;
    let output = agent
        .client
        .exec(&ExecCommand::shell(
            "printf 'b\\na\\nc\\n' | sort | tr a-z A-Z | head -n 2",
        ))
        .await
        .unwrap();
    assert_eq!(output.stdout, b"A\nB\n");
}

#[tokio::test]
async fn runs_as_another_user() {
    let agent = TestAgent::start().await;
    let output = agent
        .client
        .exec(&ExecCommand::shell("id -u; id -g").user("65534"))
        .await
        .unwrap();
    assert_eq!(output.stdout_lossy(), "65534\n65534\n");
    // As that user, root-only places are off limits.
    let denied = agent
        .client
        .exec(&ExecCommand::shell("echo x > /root/dormouse-denied").user("65534"))
        .await
        .unwrap();
    assert_ne!(denied.exit_code(), Some(0));
    let unknown = agent
        .client
        .exec(&ExecCommand::new("true").user("no-such-user-dormouse"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Some(Code::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_commands() {
    let agent = TestAgent::start().await;
    let started = Instant::now();
    let runs = (0..10).map(|index| {
        let client = agent.client.clone();
        tokio::spawn(async move {
            client
                .exec(&ExecCommand::shell(format!("sleep 0.5; echo {index}")))
                .await
                .unwrap()
        })
    });
    let outputs = futures_join_all(runs).await;
    for (index, output) in outputs.into_iter().enumerate() {
        assert_eq!(output.stdout_lossy(), format!("{index}\n"));
    }
    // Sequential execution would take at least 5 s.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

async fn futures_join_all<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut results = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        results.push(handle.await.unwrap());
    }
    results
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let agent = TestAgent::start().await;
    let started = Instant::now();
    let output = agent
        .client
        .exec(&ExecCommand::shell("sleep 30; echo never").timeout(Duration::from_millis(300)))
        .await
        .unwrap();
    assert!(output.timed_out);
    assert_eq!(output.signal(), Some(libc::SIGKILL));
    assert!(output.stdout.is_empty());
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn background_child_holding_the_pipe_does_not_hang_exec() {
    let agent = TestAgent::start().await;
    let started = Instant::now();
    let output = agent
        .client
        .exec(&ExecCommand::shell("sleep 5 & echo done"))
        .await
        .unwrap();
    assert_eq!(output.stdout, b"done\n");
    assert!(output.success());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn streaming_exec_interacts() {
    let agent = TestAgent::start().await;
    let mut session = agent
        .client
        .exec_stream(&ExecCommand::shell(
            "while read line; do echo \"got $line\"; echo \"err $line\" >&2; done; exit 7",
        ))
        .await
        .unwrap();
    assert!(session.pid() > 0);

    session.write_stdin(b"one\n".to_vec()).await.unwrap();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    while !stdout.ends_with(b"got one\n") || !stderr.ends_with(b"err one\n") {
        match session.next_event().await.unwrap().unwrap() {
            ExecEvent::Stdout(data) => stdout.extend(data),
            ExecEvent::Stderr(data) => stderr.extend(data),
            ExecEvent::Exit { .. } => panic!("exited early"),
        }
    }
    // The reply came while the process is still running.
    session.write_stdin(b"two\n".to_vec()).await.unwrap();
    session.close_stdin().await.unwrap();
    let rest = session.wait().await.unwrap();
    assert_eq!(rest.stdout, b"got two\n");
    assert_eq!(rest.stderr, b"err two\n");
    assert_eq!(rest.exit_code(), Some(7));
}

#[tokio::test]
async fn streaming_large_output_in_order() {
    let agent = TestAgent::start().await;
    let session = agent
        .client
        .exec_stream(&ExecCommand::new("seq").args(["1", "50000"]))
        .await
        .unwrap();
    let output = session.wait().await.unwrap();
    let expected: String = (1..=50000).map(|i| format!("{i}\n")).collect();
    assert_eq!(output.stdout_lossy(), expected);
    assert!(output.success());
}

#[tokio::test]
async fn streaming_signal_and_kill() {
    let agent = TestAgent::start().await;
    let session = agent
        .client
        .exec_stream(&ExecCommand::new("sleep").arg("30"))
        .await
        .unwrap();
    session.signal(libc::SIGTERM).await.unwrap();
    let output = session.wait().await.unwrap();
    assert_eq!(output.signal(), Some(libc::SIGTERM));

    let session = agent
        .client
        .exec_stream(&ExecCommand::new("sleep").arg("30"))
        .await
        .unwrap();
    assert_eq!(agent.client.ping().await.unwrap().running_processes, 1);
    session.kill().await.unwrap();
    let output = session.wait().await.unwrap();
    assert_eq!(output.signal(), Some(libc::SIGKILL));
}

/// Signal 0 means kill(2)'s probe everywhere: through `Kill` (which used to turn it into
/// SIGKILL) and through a session's stream; `kill()` is SIGKILL.
#[tokio::test]
async fn signal_zero_probes_and_kill_kills() {
    let agent = TestAgent::start().await;
    let mut session = agent
        .client
        .exec_stream(&ExecCommand::new("cat"))
        .await
        .unwrap();
    let pid = session.pid();
    agent.client.kill(pid, 0, false).await.unwrap();
    agent.client.kill(pid, 0, true).await.unwrap();
    session.signal(0).await.unwrap();
    // Still alive: it echoes what it reads.
    session.write_stdin(b"alive\n".to_vec()).await.unwrap();
    assert_eq!(
        session.next_event().await.unwrap(),
        Some(ExecEvent::Stdout(b"alive\n".to_vec()))
    );
    session.kill().await.unwrap();
    let output = session.wait().await.unwrap();
    assert_eq!(output.signal(), Some(libc::SIGKILL));
    assert!(wait_gone(pid, Duration::from_secs(5)).await);
    // A probe of a process that is gone fails.
    let gone = agent.client.kill(pid, 0, true).await.unwrap_err();
    assert_eq!(gone.code(), Some(Code::NotFound), "{gone}");
}

#[tokio::test]
async fn kill_by_pid_ends_a_running_exec() {
    let agent = TestAgent::start().await;
    let pid_file = agent.path("pid");
    let client = agent.client.clone();
    let command = ExecCommand::shell(format!("echo started; echo $$ > {pid_file}; exec sleep 30"));
    let running = tokio::spawn(async move { client.exec(&command).await.unwrap() });
    let deadline = Instant::now() + Duration::from_secs(5);
    let pid: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "pid file never appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    agent.client.kill(pid, libc::SIGKILL, false).await.unwrap();
    let output = running.await.unwrap();
    assert_eq!(output.pid, pid);
    assert_eq!(output.signal(), Some(libc::SIGKILL));
    assert_eq!(output.stdout, b"started\n");
}

#[tokio::test]
async fn dropping_a_session_kills_the_process() {
    let agent = TestAgent::start().await;
    let mut session = agent
        .client
        .exec_stream(&ExecCommand::shell("echo ready; exec sleep 30"))
        .await
        .unwrap();
    let pid = session.pid();
    assert_eq!(
        session.next_event().await.unwrap(),
        Some(ExecEvent::Stdout(b"ready\n".to_vec()))
    );
    drop(session);
    assert!(
        wait_gone(pid, Duration::from_secs(5)).await,
        "process {pid} survived"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.client.ping().await.unwrap().running_processes != 0 {
        assert!(Instant::now() < deadline, "process table not cleaned up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn misuse_returns_grpc_errors() {
    let agent = TestAgent::start().await;
    let client = &agent.client;

    let missing = client
        .exec(&ExecCommand::new("/no/such/binary"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Some(Code::NotFound), "{missing}");
    let missing_in_path = client
        .exec(&ExecCommand::new("no-such-command-dormouse"))
        .await
        .unwrap_err();
    assert_eq!(missing_in_path.code(), Some(Code::NotFound));

    let empty = client.exec(&ExecCommand::default()).await.unwrap_err();
    assert_eq!(empty.code(), Some(Code::InvalidArgument));

    let relative_cwd = client
        .exec(&ExecCommand::new("true").cwd("tmp"))
        .await
        .unwrap_err();
    assert_eq!(relative_cwd.code(), Some(Code::InvalidArgument));
    let missing_cwd = client
        .exec(&ExecCommand::new("true").cwd("/no/such/dir"))
        .await
        .unwrap_err();
    assert_eq!(missing_cwd.code(), Some(Code::NotFound));
    // Names the directory, not the program, and prints a clean code name.
    assert_eq!(
        missing_cwd.to_string(),
        "agent call failed: not found: working directory `/no/such/dir` does not exist"
    );
    assert!(missing_in_path
        .to_string()
        .contains("program `no-such-command-dormouse` not found"));

    let not_executable = agent.path("data.txt");
    std::fs::write(&not_executable, "x").unwrap();
    let denied = client
        .exec(&ExecCommand::new(not_executable))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Some(Code::PermissionDenied));

    let oversized = client
        .exec(&ExecCommand::new("cat").stdin(vec![b'x'; 17 * 1024 * 1024]))
        .await
        .unwrap_err();
    assert_eq!(oversized.code(), Some(Code::ResourceExhausted));

    let no_such_pid = client.kill(4_000_000, 0, false).await.unwrap_err();
    assert_eq!(no_such_pid.code(), Some(Code::NotFound));
    let pid_zero = client.kill(0, 0, false).await.unwrap_err();
    assert_eq!(pid_zero.code(), Some(Code::InvalidArgument));
    let myself = client.kill(std::process::id(), 0, false).await.unwrap_err();
    assert_eq!(myself.code(), Some(Code::InvalidArgument));
    let init = client.kill(1, libc::SIGTERM, false).await.unwrap_err();
    assert_eq!(init.code(), Some(Code::InvalidArgument));

    // ExecStream must start with `start`.
    let bad_first = client
        .grpc()
        .exec_stream(tokio_stream::iter([ExecStreamRequest {
            msg: Some(exec_stream_request::Msg::Stdin(b"x".to_vec())),
        }]))
        .await
        .unwrap_err();
    assert_eq!(bad_first.code(), Code::InvalidArgument);

    // The agent is still healthy afterwards.
    assert!(client
        .exec(&ExecCommand::new("true"))
        .await
        .unwrap()
        .success());
}
