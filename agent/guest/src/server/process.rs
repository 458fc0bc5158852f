//! Turns a [`ProcessSpec`] into a running child with non-blocking pipes.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tonic::Status;

use super::reaper::{reaper, WaitStatus};
use super::status::{invalid, io_status};
use super::user::{resolve_user, UserIdentity};
use crate::proto::{exit_status::Outcome, ExitStatus, ProcessSpec};

/// PATH for children when neither the request nor the agent provides one
/// (the kernel starts init without PATH).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const PASSWD: &str = "/etc/passwd";

/// A freshly spawned child: its own process group leader (pgid == pid).
pub struct SpawnedProcess {
    pub pid: u32,
    pub stdin: pipe::Sender,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
    pub exit: oneshot::Receiver<WaitStatus>,
}

/// Validates `spec` and spawns it. Fork/exec runs on the blocking pool: it
/// is slow in the guest and must not stall the (single-threaded) runtime.
pub async fn spawn(spec: &ProcessSpec) -> Result<SpawnedProcess, Status> {
    let mut command = build_command(spec, Path::new(PASSWD))?;
    let what = describe(spec);
    let spawned = tokio::task::spawn_blocking(move || reaper().spawn(&mut command))
        .await
        .map_err(|err| Status::internal(format!("spawn task failed: {err}")))?;
    let (mut child, exit) = spawned.map_err(|err| io_status(format!("cannot run {what}"), &err))?;

    let pid = child.id();
    let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    // Dropping `child` neither kills nor waits; the reaper owns its status.
    drop(child);
    let (Some(stdin), Some(stdout), Some(stderr)) = pipes else {
        return Err(Status::internal("child pipes missing"));
    };
    let pipe_error = |err: std::io::Error| io_status("cannot set up child pipes", &err);
    Ok(SpawnedProcess {
        pid,
        stdin: pipe::Sender::from_owned_fd(OwnedFd::from(stdin)).map_err(pipe_error)?,
        stdout: pipe::Receiver::from_owned_fd(OwnedFd::from(stdout)).map_err(pipe_error)?,
        stderr: pipe::Receiver::from_owned_fd(OwnedFd::from(stderr)).map_err(pipe_error)?,
        exit,
    })
}

/// Builds the command for `spec` (argv, environment, cwd, identity, pipes,
/// own process group) without running it.
pub fn build_command(spec: &ProcessSpec, passwd: &Path) -> Result<Command, Status> {
    let mut command = match (spec.command.is_empty(), spec.shell.is_empty()) {
        (false, true) => {
            let mut command = Command::new(&spec.command);
            command.args(&spec.args);
            command
        }
        (true, false) => {
            if !spec.args.is_empty() {
                return Err(invalid("`args` cannot be combined with `shell`"));
            }
            let mut command = Command::new("/bin/sh");
            command.arg("-c").arg(&spec.shell);
            command
        }
        (true, true) => return Err(invalid("one of `command` or `shell` is required")),
        (false, false) => return Err(invalid("`command` and `shell` are mutually exclusive")),
    };
    if spec.command.contains('\0')
        || spec.shell.contains('\0')
        || spec.args.iter().any(|arg| arg.contains('\0'))
    {
        return Err(invalid("command line contains a NUL byte"));
    }

    let identity = if spec.user.is_empty() {
        None
    } else {
        Some(resolve_user(&spec.user, passwd)?)
    };

    apply_environment(&mut command, spec, identity.as_ref())?;

    let cwd = if spec.cwd.is_empty() {
        identity
            .as_ref()
            .and_then(|identity| identity.home.clone())
            .filter(|home| home.is_dir())
            .unwrap_or_else(|| PathBuf::from("/"))
    } else {
        super::paths::guest_path("cwd", &spec.cwd)?
    };
    command.current_dir(cwd);

    if let Some(identity) = &identity {
        // std drops supplementary groups (setgroups(0)) when running as root.
        command.gid(identity.gid).uid(identity.uid);
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own group, so timeouts and disconnects can kill the whole tree.
        .process_group(0);
    Ok(command)
}

fn apply_environment(
    command: &mut Command,
    spec: &ProcessSpec,
    identity: Option<&UserIdentity>,
) -> Result<(), Status> {
    if spec.clear_env {
        command.env_clear();
    }
    let has_path =
        spec.env.contains_key("PATH") || (!spec.clear_env && std::env::var_os("PATH").is_some());
    if !has_path {
        command.env("PATH", DEFAULT_PATH);
    }
    if let Some(identity) = identity {
        let mut defaults: Vec<(&str, String)> = Vec::new();
        if let Some(home) = &identity.home {
            defaults.push(("HOME", home.display().to_string()));
        }
        if let Some(name) = &identity.name {
            defaults.push(("USER", name.clone()));
            defaults.push(("LOGNAME", name.clone()));
        }
        for (key, value) in defaults {
            if !spec.env.contains_key(key) {
                command.env(key, value);
            }
        }
    }
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(invalid(format!("invalid environment variable `{key}`")));
        }
        command.env(key, value);
    }
    Ok(())
}

/// Short human description of what `spec` runs, for error messages.
pub fn describe(spec: &ProcessSpec) -> String {
    if spec.shell.is_empty() {
        format!("`{}`", spec.command)
    } else {
        format!("shell command `{}`", spec.shell)
    }
}

/// Converts a raw wait status into the protocol's exit status.
pub fn exit_status(status: WaitStatus, timed_out: bool) -> ExitStatus {
    let outcome = if libc::WIFEXITED(status) {
        Outcome::Code(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Outcome::Signal(libc::WTERMSIG(status))
    } else {
        // waitpid without WUNTRACED/WCONTINUED reports only exits; keep the
        // raw value rather than inventing one.
        Outcome::Code(status)
    };
    ExitStatus {
        outcome: Some(outcome),
        timed_out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ProcessSpec {
        ProcessSpec::default()
    }

    #[test]
    fn command_or_shell_required_and_exclusive() {
        let passwd = Path::new("/etc/passwd");
        let err = build_command(&spec(), passwd).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let both = ProcessSpec {
            command: "ls".into(),
            shell: "ls".into(),
            ..spec()
        };
        assert_eq!(
            build_command(&both, passwd).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let relative_cwd = ProcessSpec {
            command: "ls".into(),
            cwd: "tmp".into(),
            ..spec()
        };
        assert_eq!(
            build_command(&relative_cwd, passwd).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn shell_runs_through_sh() {
        let shell = ProcessSpec {
            shell: "echo hi | wc -c".into(),
            ..spec()
        };
        let command = build_command(&shell, Path::new("/etc/passwd")).unwrap();
        assert_eq!(command.get_program(), "/bin/sh");
        let args: Vec<_> = command.get_args().collect();
        assert_eq!(args, ["-c", "echo hi | wc -c"]);
    }

    #[test]
    fn bad_env_key_rejected() {
        let bad = ProcessSpec {
            command: "env".into(),
            env: [("A=B".to_owned(), "c".to_owned())].into(),
            ..spec()
        };
        assert_eq!(
            build_command(&bad, Path::new("/etc/passwd"))
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn wait_status_decoding() {
        // exit(3): status 3 << 8; killed by SIGKILL: status 9.
        assert_eq!(exit_status(3 << 8, false).outcome, Some(Outcome::Code(3)));
        assert_eq!(exit_status(9, true).outcome, Some(Outcome::Signal(9)));
        assert!(exit_status(9, true).timed_out);
    }
}
