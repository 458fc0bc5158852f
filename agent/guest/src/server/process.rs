//! Turns a [`ProcessSpec`] into a running child with non-blocking pipes.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tonic::Status;

use super::fast_spawn;
use super::reaper::{reaper, WaitStatus};
use super::status::{bounded, invalid, io_status};
use super::user::{resolve_identity, resolve_user, UserIdentity};
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
    let defaults = super::exec_defaults::installed();
    let applied;
    let spec = if defaults.is_empty() {
        spec
    } else {
        applied = defaults.apply(spec);
        &applied
    };
    let launch = Launch::prepare(spec, Path::new(PASSWD))?;
    let pipe_error = |err: std::io::Error| io_status("cannot set up child pipes", &err);
    if launch.identity.is_none() {
        // The agent's own user: posix_spawn, no fork (see `fast_spawn`).
        let launch = std::sync::Arc::new(launch);
        let shared = launch.clone();
        let spawned = tokio::task::spawn_blocking(move || {
            reaper().spawn_with(|| {
                let child = fast_spawn::spawn(&fast_spawn::Spawn {
                    program: &shared.program,
                    args: &shared.args,
                    env: &shared.env,
                    cwd: &shared.cwd,
                    default_path: DEFAULT_PATH,
                })?;
                Ok((child.pid, child))
            })
        })
        .await
        .map_err(|err| Status::internal(format!("spawn task failed: {err}")))?;
        let (child, exit) = spawned.map_err(|err| spawn_error(spec, &launch.cwd, &err))?;
        return Ok(SpawnedProcess {
            pid: u32::try_from(child.pid).unwrap_or_default(),
            stdin: pipe::Sender::from_owned_fd(child.stdin).map_err(pipe_error)?,
            stdout: pipe::Receiver::from_owned_fd(child.stdout).map_err(pipe_error)?,
            stderr: pipe::Receiver::from_owned_fd(child.stderr).map_err(pipe_error)?,
            exit,
        });
    }
    let mut command = launch.command()?;
    let spawned = tokio::task::spawn_blocking(move || reaper().spawn(&mut command))
        .await
        .map_err(|err| Status::internal(format!("spawn task failed: {err}")))?;
    let (mut child, exit) = spawned.map_err(|err| spawn_error(spec, &launch.cwd, &err))?;

    let pid = child.id();
    let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    // Dropping `child` neither kills nor waits; the reaper owns its status.
    drop(child);
    let (Some(stdin), Some(stdout), Some(stderr)) = pipes else {
        return Err(Status::internal("child pipes missing"));
    };
    Ok(SpawnedProcess {
        pid,
        stdin: pipe::Sender::from_owned_fd(OwnedFd::from(stdin)).map_err(pipe_error)?,
        stdout: pipe::Receiver::from_owned_fd(OwnedFd::from(stdout)).map_err(pipe_error)?,
        stderr: pipe::Receiver::from_owned_fd(OwnedFd::from(stderr)).map_err(pipe_error)?,
        exit,
    })
}

/// Added to the errno of a failed `chdir` in the child: std reports a pre-exec hook's error
/// and exec's own the same way (a raw errno), and a missing directory must not read like a
/// missing program. Far above any real errno.
const CHDIR_ERRNO_BASE: i32 = 1 << 20;

/// Names what was missing or refused: the working directory, else the program.
fn spawn_error(spec: &ProcessSpec, cwd: &Path, err: &std::io::Error) -> Status {
    let cwd_shown = cwd.display();
    match err.raw_os_error() {
        Some(raw) if raw >= CHDIR_ERRNO_BASE => {
            let errno = raw - CHDIR_ERRNO_BASE;
            let err = std::io::Error::from_raw_os_error(errno);
            let what = match errno {
                libc::ENOENT => format!("working directory `{cwd_shown}` does not exist"),
                libc::ENOTDIR => format!("working directory `{cwd_shown}` is not a directory"),
                _ => format!("cannot enter working directory `{cwd_shown}`: {err}"),
            };
            Status::new(super::status::io_code(&err), bounded(what))
        }
        // The directory vanished between the check and the spawn (std's own chdir).
        Some(libc::ENOENT) if !cwd.is_dir() => Status::not_found(bounded(format!(
            "working directory `{cwd_shown}` does not exist"
        ))),
        // exec's ENOENT also means a script's `#!` interpreter is missing.
        Some(libc::ENOENT) if spec.shell.is_empty() && Path::new(&spec.command).is_file() => {
            Status::not_found(bounded(format!(
                "cannot run `{}`: its interpreter (`#!` line) was not found",
                spec.command
            )))
        }
        Some(libc::ENOENT) => Status::not_found(bounded(if spec.shell.is_empty() {
            format!("program `{}` not found", spec.command)
        } else {
            "shell `/bin/sh` not found".to_owned()
        })),
        _ => io_status(format!("cannot run {}", describe(spec)), err),
    }
}

/// What a spec launches, validated: argv, the child's whole environment, its working directory
/// and, for another user, its identity. Spawned either by [`Launch::command`] (std, which forks:
/// needed to change uid) or by `fast_spawn` (posix_spawn, no fork: the agent's own user).
#[derive(Debug)]
pub struct Launch {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
    pub identity: Option<UserIdentity>,
}

impl Launch {
    /// Validates `spec` and resolves its identity, environment and working directory.
    pub fn prepare(spec: &ProcessSpec, passwd: &Path) -> Result<Self, Status> {
        let (program, args) = match (spec.command.is_empty(), spec.shell.is_empty()) {
            (false, true) => (spec.command.clone(), spec.args.clone()),
            (true, false) => {
                if !spec.args.is_empty() {
                    return Err(invalid("`args` cannot be combined with `shell`"));
                }
                (
                    "/bin/sh".to_owned(),
                    vec!["-c".to_owned(), spec.shell.clone()],
                )
            }
            (true, true) => return Err(invalid("one of `command` or `shell` is required")),
            (false, false) => return Err(invalid("`command` and `shell` are mutually exclusive")),
        };
        if program.contains('\0') || args.iter().any(|arg| arg.contains('\0')) {
            return Err(invalid("command line contains a NUL byte"));
        }
        let identity = if spec.user.is_empty() {
            None
        } else {
            Some(resolve_identity(&spec.user, passwd)?)
        };
        let env = environment(spec, identity.as_ref())?;
        let cwd = working_dir(spec, identity.as_ref(), passwd)?;
        Ok(Self {
            program,
            args,
            env,
            cwd,
            identity,
        })
    }

    /// The std command (pipes, own process group; for another user: uid/gid and a chdir in the
    /// child).
    pub fn command(&self) -> Result<Command, Status> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env_clear()
            .envs(self.env.iter().cloned());
        if let Some(identity) = &self.identity {
            // std drops supplementary groups (setgroups(0)) when running as root.
            command.gid(identity.gid).uid(identity.uid);
            // Another user may be refused the directory: only the child can tell. (std forks
            // for a uid change anyway, so the hook costs nothing.)
            enter_in_child(&mut command, &self.cwd)?;
        } else {
            command.current_dir(&self.cwd);
        }
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own group, so timeouts and disconnects can kill the whole tree.
            .process_group(0);
        Ok(command)
    }
}

/// Builds the std command for `spec` (argv, environment, cwd, identity, pipes, own process
/// group) without running it; also returns the working directory it enters.
#[cfg(test)]
pub fn build_command(spec: &ProcessSpec, passwd: &Path) -> Result<(Command, PathBuf), Status> {
    let launch = Launch::prepare(spec, passwd)?;
    Ok((launch.command()?, launch.cwd))
}

/// `spec.cwd`, else the home directory of the user the process runs as (`spec.user`, or the
/// agent's own user) from the passwd file, else `/` (no entry, or the home does not exist).
fn working_dir(
    spec: &ProcessSpec,
    identity: Option<&UserIdentity>,
    passwd: &Path,
) -> Result<PathBuf, Status> {
    if !spec.cwd.is_empty() {
        let cwd = super::paths::guest_path("cwd", &spec.cwd)?;
        // Checked here too, so the common mistake gets its own words before any fork.
        return match std::fs::metadata(&cwd) {
            Ok(metadata) if metadata.is_dir() => Ok(cwd),
            Ok(_) => Err(Status::failed_precondition(bounded(format!(
                "working directory `{}` is not a directory",
                cwd.display()
            )))),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                Err(Status::not_found(bounded(format!(
                    "working directory `{}` does not exist",
                    cwd.display()
                ))))
            }
            // E.g. a search permission the agent lacks: let the child's chdir report it.
            Err(_) => Ok(cwd),
        };
    }
    let home = match identity {
        Some(identity) => identity.home.clone(),
        // SAFETY: getuid has no preconditions and cannot fail.
        None => resolve_user(&unsafe { libc::getuid() }.to_string(), passwd)
            .ok()
            .and_then(|own| own.home),
    };
    Ok(home
        .filter(|home| home.is_dir())
        .unwrap_or_else(|| PathBuf::from("/")))
}

/// Makes the child `chdir(cwd)` after taking its identity (as std's `current_dir` would),
/// reporting a failure with [`CHDIR_ERRNO_BASE`] added so the parent can tell it from exec's.
fn enter_in_child(command: &mut Command, cwd: &Path) -> Result<(), Status> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(cwd.as_os_str().as_bytes())
        .map_err(|_| invalid("cwd contains a NUL byte"))?;
    // SAFETY: the hook runs in the forked child before exec and only calls chdir(2) (async-
    // signal-safe) on a string allocated before the fork, and reads errno; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::chdir(path.as_ptr()) == 0 {
                return Ok(());
            }
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            Err(std::io::Error::from_raw_os_error(CHDIR_ERRNO_BASE + errno))
        });
    }
    Ok(())
}

/// The child's whole environment: the agent's own (unless `clear_env`), PATH when there is
/// none, HOME/USER/LOGNAME of another user, then the request's variables.
fn environment(
    spec: &ProcessSpec,
    identity: Option<&UserIdentity>,
) -> Result<Vec<(OsString, OsString)>, Status> {
    let mut env: Vec<(OsString, OsString)> = if spec.clear_env {
        Vec::new()
    } else {
        std::env::vars_os().collect()
    };
    let set = |env: &mut Vec<(OsString, OsString)>, key: &str, value: OsString| {
        env.retain(|(existing, _)| existing != key);
        env.push((key.into(), value));
    };
    if !spec.env.contains_key("PATH") && !env.iter().any(|(key, _)| key == "PATH") {
        set(&mut env, "PATH", DEFAULT_PATH.into());
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
                set(&mut env, key, value.into());
            }
        }
    }
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(invalid(format!("invalid environment variable `{key}`")));
        }
        set(&mut env, key, value.into());
    }
    Ok(env)
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
        let (command, _) = build_command(&shell, Path::new("/etc/passwd")).unwrap();
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

    fn own_passwd(home: &Path) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        // SAFETY: no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        writeln!(file, "me:x:{uid}:{gid}::{}:/bin/sh", home.display()).unwrap();
        writeln!(file, "gone:x:4321:4321::/no/such/home:/bin/sh").unwrap();
        file
    }

    #[test]
    fn default_cwd_is_the_users_home_else_root() {
        let home = tempfile::tempdir().unwrap();
        let passwd = own_passwd(home.path());
        let command = ProcessSpec {
            command: "true".into(),
            ..spec()
        };
        // No `user`: the agent's own passwd entry.
        let (_, cwd) = build_command(&command, passwd.path()).unwrap();
        assert_eq!(cwd, home.path());
        let as_gone = ProcessSpec {
            user: "gone".into(),
            ..command.clone()
        };
        let (_, cwd) = build_command(&as_gone, passwd.path()).unwrap();
        assert_eq!(cwd, Path::new("/"));
        let explicit = ProcessSpec {
            cwd: "/tmp".into(),
            ..command
        };
        assert_eq!(
            build_command(&explicit, passwd.path()).unwrap().1,
            Path::new("/tmp")
        );
    }

    #[test]
    fn errors_name_what_is_missing() {
        let passwd = Path::new("/etc/passwd");
        let missing_dir = ProcessSpec {
            command: "true".into(),
            cwd: "/no/such/dir".into(),
            ..spec()
        };
        let err = build_command(&missing_dir, passwd).unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert_eq!(
            err.message(),
            "working directory `/no/such/dir` does not exist"
        );

        let file = tempfile::NamedTempFile::new().unwrap();
        let not_dir = ProcessSpec {
            cwd: file.path().display().to_string(),
            ..missing_dir.clone()
        };
        let err = build_command(&not_dir, passwd).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains("is not a directory"),
            "{}",
            err.message()
        );

        // What the child's chdir reports (as another user) and what exec reports.
        let enoent = |raw| std::io::Error::from_raw_os_error(raw);
        let program = ProcessSpec {
            command: "no-such-program".into(),
            ..spec()
        };
        let from_chdir = spawn_error(
            &program,
            Path::new("/no/such/dir"),
            &enoent(CHDIR_ERRNO_BASE + libc::ENOENT),
        );
        assert_eq!(
            from_chdir.message(),
            "working directory `/no/such/dir` does not exist"
        );
        let denied = spawn_error(
            &program,
            Path::new("/root"),
            &enoent(CHDIR_ERRNO_BASE + libc::EACCES),
        );
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied
            .message()
            .starts_with("cannot enter working directory `/root`"));
        let from_exec = spawn_error(&program, Path::new("/"), &enoent(libc::ENOENT));
        assert_eq!(from_exec.code(), tonic::Code::NotFound);
        assert_eq!(from_exec.message(), "program `no-such-program` not found");
        let script = tempfile::NamedTempFile::new().unwrap();
        let script_spec = ProcessSpec {
            command: script.path().display().to_string(),
            ..spec()
        };
        let interpreter = spawn_error(&script_spec, Path::new("/"), &enoent(libc::ENOENT));
        assert!(interpreter
            .message()
            .ends_with("its interpreter (`#!` line) was not found"));

        let unknown_user = ProcessSpec {
            user: "mallory-not-a-user".into(),
            ..program
        };
        let err = build_command(&unknown_user, passwd).unwrap_err();
        assert!(err
            .message()
            .starts_with("user `mallory-not-a-user` not found"));
    }

    #[test]
    fn wait_status_decoding() {
        // exit(3): status 3 << 8; killed by SIGKILL: status 9.
        assert_eq!(exit_status(3 << 8, false).outcome, Some(Outcome::Code(3)));
        assert_eq!(exit_status(9, true).outcome, Some(Outcome::Signal(9)));
        assert!(exit_status(9, true).timed_out);
    }
}
