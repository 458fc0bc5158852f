//! Starting a process as the agent's own user without fork: `posix_spawn`, which glibc runs as
//! `clone(CLONE_VM | CLONE_VFORK)`. std's `Command::spawn` forks here (its posix_spawn path is
//! not taken in this static binary with a working directory set): a fork copies the agent's page
//! tables and makes every page it writes afterwards fault once, and in a guest whose kernel is
//! emulated that is most of an Exec's cost. Another user still goes through std (a uid change
//! needs code in the child).
//!
//! Same contract as the std path: three pipes (the parent's ends close-on-exec), the child in a
//! process group of its own, every signal at its default and none blocked (std ignores SIGPIPE
//! in the agent; the child must not inherit that), the environment and directory of the
//! launch, PATH searched in the child's environment as execvp would; and no descriptor but
//! 0-2, even one the agent inherited without close-on-exec.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A started child: its pid and the parent's ends of its stdin, stdout and stderr.
pub struct FastChild {
    pub pid: libc::pid_t,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// What to start, as the agent's own user.
pub struct Spawn<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    /// The child's whole environment.
    pub env: &'a [(OsString, OsString)],
    pub cwd: &'a Path,
    /// Searched for `program` when the environment has no PATH.
    pub default_path: &'a str,
}

/// Starts `spawn`'s program.
pub fn spawn(spawn: &Spawn) -> io::Result<FastChild> {
    let program = resolve_program(spawn.program, path_of(spawn))?;
    let program = c_string(program.as_os_str())?;
    let mut argv = Vec::with_capacity(spawn.args.len() + 1);
    argv.push(c_string(OsStr::new(spawn.program))?);
    for arg in spawn.args {
        argv.push(c_string(OsStr::new(arg))?);
    }
    let mut envp = Vec::with_capacity(spawn.env.len());
    for (key, value) in spawn.env {
        let mut pair = key.as_bytes().to_vec();
        pair.push(b'=');
        pair.extend_from_slice(value.as_bytes());
        envp.push(CString::new(pair).map_err(|_| nul_error())?);
    }
    let cwd = c_string(spawn.cwd.as_os_str())?;
    let argv_ptrs = null_terminated(&argv);
    let envp_ptrs = null_terminated(&envp);

    let (stdin_read, stdin_write) = pipe()?;
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let mut actions = FileActions::new()?;
    actions.dup2(raw(&stdin_read), 0)?;
    actions.dup2(raw(&stdout_write), 1)?;
    actions.dup2(raw(&stderr_write), 2)?;
    actions.chdir(&cwd)?;
    // Nothing but stdio, whatever the agent inherited without close-on-exec.
    actions.close_from(3)?;
    let attributes = Attributes::new()?;

    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid for the call: the program and argument strings and the
    // NULL-terminated arrays live until it returns, the file actions and attributes were
    // initialised above. posix_spawn returns an errno value (0 on success).
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            program.as_ptr(),
            &actions.0,
            &attributes.0,
            argv_ptrs.as_ptr(),
            envp_ptrs.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // The child's ends close here, in the parent.
    drop((stdin_read, stdout_write, stderr_write));
    Ok(FastChild {
        pid,
        stdin: stdin_write,
        stdout: stdout_read,
        stderr: stderr_read,
    })
}

/// The PATH the child gets (execvp searches the new environment's, not the agent's).
fn path_of<'a>(spawn: &Spawn<'a>) -> &'a OsStr {
    spawn
        .env
        .iter()
        .rev()
        .find(|(key, _)| key == "PATH")
        .map(|(_, value)| value.as_os_str())
        .unwrap_or(OsStr::new(spawn.default_path))
}

/// `program` itself when it names a path, else the first executable file of that name in
/// `path`'s directories; ENOENT when there is none (EACCES when only non-executable ones).
pub fn resolve_program(program: &str, path: &OsStr) -> io::Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    if program.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    let mut denied = false;
    for dir in path.as_bytes().split(|&byte| byte == b':') {
        // An empty entry means the current directory, as in execvp.
        let dir = if dir.is_empty() { b".".as_slice() } else { dir };
        let candidate = Path::new(OsStr::from_bytes(dir)).join(program);
        let Ok(metadata) = candidate.metadata() else {
            continue;
        };
        if !metadata.is_file() {
            continue;
        }
        let c_path = c_string(candidate.as_os_str())?;
        // SAFETY: access reads a NUL-terminated path.
        if unsafe { libc::access(c_path.as_ptr(), libc::X_OK) } == 0 {
            return Ok(candidate);
        }
        denied = true;
    }
    Err(io::Error::from_raw_os_error(if denied {
        libc::EACCES
    } else {
        libc::ENOENT
    }))
}

fn c_string(value: &OsStr) -> io::Result<CString> {
    CString::new(value.as_bytes()).map_err(|_| nul_error())
}

fn nul_error() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the command")
}

fn null_terminated(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}

fn raw(fd: &OwnedFd) -> RawFd {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Errno-returning posix_spawn helpers to io::Result.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<Self> {
        // SAFETY: an all-zero value is a valid destination for init, which fills it.
        let mut actions: libc::posix_spawn_file_actions_t = unsafe { std::mem::zeroed() };
        // SAFETY: init on storage we own.
        check(unsafe { libc::posix_spawn_file_actions_init(&mut actions) })?;
        Ok(Self(actions))
    }

    fn dup2(&mut self, from: RawFd, to: RawFd) -> io::Result<()> {
        // SAFETY: the actions were initialised in `new`.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, from, to) })
    }

    fn close_from(&mut self, first: RawFd) -> io::Result<()> {
        // SAFETY: the actions were initialised in `new` (glibc 2.34+; the agent links it
        // statically).
        check(unsafe { libc::posix_spawn_file_actions_addclosefrom_np(&mut self.0, first) })
    }

    fn chdir(&mut self, dir: &CString) -> io::Result<()> {
        // SAFETY: as above; glibc copies the path.
        check(unsafe { libc::posix_spawn_file_actions_addchdir_np(&mut self.0, dir.as_ptr()) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, destroyed once.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// Signals the agent itself was started with ignored (as a bit set, signal n at bit n - 1): a
/// PID 1 has none, an agent started under `nohup` has SIGHUP. Exec keeps ignored signals, so
/// they are reset for every child too. Read once: nothing in the agent ignores a signal later.
fn inherited_ignored() -> u64 {
    static IGNORED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *IGNORED.get_or_init(|| {
        let mut bits = 0u64;
        for signal in 1..=64 {
            // Not resettable (KILL, STOP) or glibc's own (32, 33: listed by the caller).
            if matches!(signal, libc::SIGKILL | libc::SIGSTOP | 32 | 33) {
                continue;
            }
            // SAFETY: an all-zero sigaction is valid storage for the old action.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: reads the current action only (null new action).
            let read = unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) };
            if read == 0 && old.sa_sigaction == libc::SIG_IGN {
                bits |= 1u64 << (signal - 1);
            }
        }
        bits
    })
}

struct Attributes(libc::posix_spawnattr_t);

impl Attributes {
    /// Own process group, no blocked signals, no ignored signal.
    fn new() -> io::Result<Self> {
        // SAFETY: an all-zero value is a valid destination for init, which fills it.
        let mut attributes: libc::posix_spawnattr_t = unsafe { std::mem::zeroed() };
        // SAFETY: init on storage we own.
        check(unsafe { libc::posix_spawnattr_init(&mut attributes) })?;
        let mut this = Self(attributes);
        // SAFETY: zeroed sigset_t storage is filled by sigemptyset.
        let mut none: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: the set is ours.
        unsafe { libc::sigemptyset(&mut none) };
        // Only what would survive exec needs resetting: ignored signals (handlers are reset by
        // exec, and glibc's spawn helper already resets them for the child). std ignores
        // SIGPIPE in the agent; glibc's helper sets its internal signals (32, 33) to SIG_IGN
        // for the child unless they are listed here, and a musl or Go program would find them
        // so. Listing all 64 would cost the child 64 sigaction calls (~20 ms in an emulated
        // guest kernel).
        // SAFETY: zeroed sigset_t storage is filled by sigemptyset.
        let mut ignored: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: the set is ours; sigaddset on valid signal numbers. glibc's own sigaddset
        // refuses its internal signals, so those bits are set directly (a sigset_t is a bit
        // array, signal n at bit n - 1).
        unsafe {
            libc::sigemptyset(&mut ignored);
            libc::sigaddset(&mut ignored, libc::SIGPIPE);
            let words: *mut u64 = std::ptr::from_mut(&mut ignored).cast();
            *words |= (1u64 << (32 - 1)) | (1u64 << (33 - 1)) | inherited_ignored();
        }
        let flags = libc::POSIX_SPAWN_SETPGROUP
            | libc::POSIX_SPAWN_SETSIGMASK
            | libc::POSIX_SPAWN_SETSIGDEF;
        let attributes: *mut libc::posix_spawnattr_t = &mut this.0;
        // SAFETY: the attributes were initialised above; the setters copy their arguments.
        unsafe {
            check(libc::posix_spawnattr_setpgroup(attributes, 0))?;
            check(libc::posix_spawnattr_setsigmask(attributes, &none))?;
            check(libc::posix_spawnattr_setsigdefault(attributes, &ignored))?;
            check(libc::posix_spawnattr_setflags(
                attributes,
                flags as libc::c_short,
            ))?;
        }
        Ok(this)
    }
}

impl Drop for Attributes {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, destroyed once.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_through_the_childs_path() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(resolve_program("tool", OsStr::new(&path)).unwrap(), tool);
        assert_eq!(
            resolve_program("/bin/sh", OsStr::new("")).unwrap(),
            Path::new("/bin/sh")
        );
        let missing = resolve_program("no-such-tool", OsStr::new(&path)).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
        // Root may execute anything with an x bit; a file with none is refused even so.
        let denied = resolve_program("plain", OsStr::new(&path)).unwrap_err();
        assert_eq!(denied.raw_os_error(), Some(libc::EACCES));
    }
}
