//! `dormouse exec`: run a command in a running VM through its guest agent, with the output
//! streamed to this terminal and the command's exit status as ours.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::io::AsyncReadExt;

use agent_client::{ExecCommand, ExecEvent, ExitOutcome};
use vmm_api::agent_link::connect_agent;

/// Exit status when the command ran past `--timeout` (as timeout(1)).
const TIMED_OUT_STATUS: i32 = 124;
/// Exit status when the command does not exist (as a shell).
const NOT_FOUND_STATUS: i32 = 127;
const STDIN_CHUNK: usize = 64 * 1024;

#[derive(Args)]
pub struct ExecArgs {
    /// The VM's API socket (the path given to `dormouse run --api-sock`).
    #[arg(long)]
    pub sock: PathBuf,
    /// Kill the command after this many seconds (exit status 124).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Seconds to wait for the guest agent to be ready.
    #[arg(long, default_value_t = 60)]
    pub wait: u64,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the guest (absolute).
    #[arg(long)]
    pub cwd: Option<String>,
    /// Run as this guest user (name or uid).
    #[arg(long)]
    pub user: Option<String>,
    /// Run the words as one `sh -c` command line.
    #[arg(long)]
    pub shell: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

fn build_command(args: &ExecArgs) -> anyhow::Result<ExecCommand> {
    let (program, rest) = args
        .command
        .split_first()
        .context("no command given (put it after `--`)")?;
    let mut command = if args.shell {
        ExecCommand::shell(args.command.join(" "))
    } else {
        ExecCommand::new(program.clone()).args(rest.iter().cloned())
    };
    for pair in &args.env {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--env takes KEY=VALUE, got `{pair}`"))?;
        command = command.env(key, value);
    }
    if let Some(cwd) = &args.cwd {
        command = command.cwd(cwd.clone());
    }
    if let Some(user) = &args.user {
        command = command.user(user.clone());
    }
    if let Some(secs) = args.timeout {
        command = command.timeout(Duration::from_secs(secs));
    }
    Ok(command)
}

pub fn exec(args: ExecArgs) -> anyhow::Result<i32> {
    let command = build_command(&args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let status = runtime.block_on(run(args, command));
    // A stdin read may still be parked on a blocking thread: do not wait for it.
    runtime.shutdown_background();
    status
}

async fn run(args: ExecArgs, command: ExecCommand) -> anyhow::Result<i32> {
    let (client, _) = connect_agent(&args.sock, Duration::from_secs(args.wait)).await?;
    let program = args.command.first().cloned().unwrap_or_default();
    let mut session = match client.exec_stream(&command).await {
        Ok(session) => session,
        Err(e) if e.code() == Some(tonic::Code::NotFound) && !args.shell => {
            eprintln!("dormouse exec: {program}: command not found in the guest ({e})");
            return Ok(NOT_FOUND_STATUS);
        }
        Err(e) => return Err(e).context(format!("cannot run `{program}` in the guest")),
    };

    // Stdin goes to the command unless it is a terminal (no interactive sessions here).
    let input = session.input();
    let stdin_task = if std::io::stdin().is_terminal() {
        input.close_stdin().await.ok();
        None
    } else {
        Some(tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; STDIN_CHUNK];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let chunk = buf.get(..n).unwrap_or_default().to_vec();
                        if input.write_stdin(chunk).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = input.close_stdin().await;
        }))
    };

    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let status = loop {
        match session
            .next_event()
            .await
            .context("the exec session failed")?
        {
            Some(ExecEvent::Stdout(data)) => {
                stdout.write_all(&data).context("writing stdout")?;
                stdout.flush().context("writing stdout")?;
            }
            Some(ExecEvent::Stderr(data)) => {
                stderr.write_all(&data).context("writing stderr")?;
            }
            Some(ExecEvent::Exit { status, timed_out }) => {
                if timed_out {
                    eprintln!(
                        "dormouse exec: `{program}` timed out after {}s and was killed",
                        args.timeout.unwrap_or_default()
                    );
                    break TIMED_OUT_STATUS;
                }
                break match status {
                    ExitOutcome::Code(code) => code,
                    ExitOutcome::Signal(signal) => 128 + signal,
                };
            }
            None => anyhow::bail!("the exec session ended without an exit status"),
        }
    };
    if let Some(task) = stdin_task {
        task.abort();
    }
    Ok(status)
}
