//! Builder for what to run, and the collected result.

use std::time::Duration;

use crate::proto::{exit_status::Outcome, ExecRequest, ExecResponse, ExitStatus, ProcessSpec};

use super::ClientError;

/// A process to run in the guest. Defaults (docs/sandbox.md, "Defaults"):
///
/// * working directory: the home directory of the user it runs as (from the guest's
///   `/etc/passwd`), or `/` when that user has none or it does not exist ([`Self::cwd`]);
/// * user: the agent's (root in the dormouse rootfs) ([`Self::user`]);
/// * environment: the agent's, plus `PATH` when it has none ([`Self::env`],
///   [`Self::clear_env`]); with a `user`, also its `HOME`, `USER` and `LOGNAME`;
/// * **no timeout**: the process runs until it exits or is signalled ([`Self::timeout`]);
/// * stdin: empty and closed; output kept per stream: the client's
///   `limits.max_exec_output_bytes` (16 MiB) ([`Self::max_output_bytes`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecCommand {
    spec: ProcessSpec,
    stdin: Vec<u8>,
    max_output_bytes: u64,
}

impl ExecCommand {
    /// Runs `program` (searched in PATH) with no arguments yet.
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            spec: ProcessSpec {
                command: program.into(),
                ..ProcessSpec::default()
            },
            ..Self::default()
        }
    }

    /// Runs `/bin/sh -c <line>`.
    pub fn shell(line: impl Into<String>) -> Self {
        Self {
            spec: ProcessSpec {
                shell: line.into(),
                ..ProcessSpec::default()
            },
            ..Self::default()
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.spec.args.push(arg.into());
        self
    }

    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<String>,
    {
        self.spec.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.spec.env.insert(key.into(), value.into());
        self
    }

    /// Start from an empty environment (plus `env` entries and a PATH).
    pub fn clear_env(mut self) -> Self {
        self.spec.clear_env = true;
        self
    }

    /// Absolute working directory; a missing one fails the call with `NotFound` naming it.
    /// Default: the user's home directory, else `/`.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.spec.cwd = cwd.into();
        self
    }

    /// User name or numeric uid. Default: the agent's own user.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.spec.user = user.into();
        self
    }

    /// The agent kills the process group after `timeout`. Default: no timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.spec.timeout_ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self
    }

    /// Bytes fed to stdin (then closed).
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = data.into();
        self
    }

    /// Per-stream output capture limit for `exec`.
    pub fn max_output_bytes(mut self, limit: u64) -> Self {
        self.max_output_bytes = limit;
        self
    }

    pub fn spec(&self) -> &ProcessSpec {
        &self.spec
    }

    pub fn stdin_bytes(&self) -> &[u8] {
        &self.stdin
    }

    pub fn to_request(&self) -> ExecRequest {
        ExecRequest {
            process: Some(self.spec.clone()),
            stdin: self.stdin.clone(),
            max_output_bytes: self.max_output_bytes,
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitOutcome {
    Code(i32),
    Signal(i32),
}

impl ExitOutcome {
    pub(crate) fn from_status(status: Option<&ExitStatus>) -> Result<(Self, bool), ClientError> {
        let status = status.ok_or_else(|| ClientError::Protocol("missing exit status".into()))?;
        let outcome = match status.outcome {
            Some(Outcome::Code(code)) => Self::Code(code),
            Some(Outcome::Signal(signal)) => Self::Signal(signal),
            None => return Err(ClientError::Protocol("exit status without outcome".into())),
        };
        Ok((outcome, status.timed_out))
    }
}

/// Result of [`super::AgentClient::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitOutcome,
    /// Killed by the agent because the timeout elapsed.
    pub timed_out: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

impl ExecOutput {
    pub(crate) fn from_response(response: ExecResponse) -> Result<Self, ClientError> {
        let (status, timed_out) = ExitOutcome::from_status(response.status.as_ref())?;
        Ok(Self {
            pid: response.pid,
            stdout: response.stdout,
            stderr: response.stderr,
            status,
            timed_out,
            stdout_truncated: response.stdout_truncated,
            stderr_truncated: response.stderr_truncated,
        })
    }

    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.status == ExitOutcome::Code(0)
    }

    pub fn exit_code(&self) -> Option<i32> {
        match self.status {
            ExitOutcome::Code(code) => Some(code),
            ExitOutcome::Signal(_) => None,
        }
    }

    pub fn signal(&self) -> Option<i32> {
        match self.status {
            ExitOutcome::Signal(signal) => Some(signal),
            ExitOutcome::Code(_) => None,
        }
    }

    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}
