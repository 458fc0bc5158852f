//! The system calls the jail makes, one small wrapper each (errors as `io::Error`).

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(flags) })
}

pub fn setns(fd: RawFd, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: setns takes a descriptor (checked by the kernel) and flags.
    check(unsafe { libc::setns(fd, nstype) })
}

/// mount(2); `source`/`fstype`/`data` may be absent.
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype
        .map(|f| CString::new(f).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL)))
        .transpose()?;
    let data = data
        .map(|d| CString::new(d).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL)))
        .transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
}

pub fn umount_detach(target: &Path) -> io::Result<()> {
    let target = cstr(target)?;
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) })
}

/// pivot_root(new_root, put_old) (no libc wrapper).
pub fn pivot_root(new_root: &Path, put_old: &Path) -> io::Result<()> {
    let new_root = cstr(new_root)?;
    let put_old = cstr(put_old)?;
    // SAFETY: two valid NUL-terminated paths.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check(ret as libc::c_int)
}

pub fn chdir(path: &Path) -> io::Result<()> {
    let path = cstr(path)?;
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::chdir(path.as_ptr()) })
}

pub fn mknod_char(path: &Path, mode: libc::mode_t, rdev: libc::dev_t) -> io::Result<()> {
    let path = cstr(path)?;
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | mode, rdev) })
}

/// chown without following a final symlink.
pub fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let path = cstr(path)?;
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::lchown(path.as_ptr(), uid, gid) })
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

pub fn setrlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `limit` is a valid rlimit that outlives the call.
    check(unsafe { libc::setrlimit(resource, &limit) })
}

/// Closes every descriptor from 3 up except those in `keep`.
pub fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|&&fd| fd > 2)
        .map(|&fd| fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    for fd in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if fd > first {
            // SAFETY: close_range takes two descriptor numbers and flags; closing descriptors
            // nothing else in this single-threaded process uses.
            let ret = unsafe { libc::syscall(libc::SYS_close_range, first, fd - 1, 0u32) };
            check(ret as libc::c_int)?;
        }
        first = fd.saturating_add(1);
    }
    Ok(())
}

pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS with 1 and zero padding arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}

pub fn set_parent_death_signal(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) })
}

pub fn no_new_privs() -> bool {
    // SAFETY: PR_GET_NO_NEW_PRIVS takes no pointer.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

pub fn clear_groups() -> io::Result<()> {
    // SAFETY: an empty list (size 0, null pointer).
    check(unsafe { libc::setgroups(0, std::ptr::null()) })
}

pub fn setresgid(gid: u32) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresgid(gid, gid, gid) })
}

pub fn setresuid(uid: u32) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresuid(uid, uid, uid) })
}

/// (real, effective, saved) user and group ids.
pub fn ids() -> ([u32; 3], [u32; 3]) {
    let (mut u, mut g) = ([0u32; 3], [0u32; 3]);
    // SAFETY: each pointer is a valid, writable u32.
    unsafe {
        libc::getresuid(&mut u[0], &mut u[1], &mut u[2]);
        libc::getresgid(&mut g[0], &mut g[1], &mut g[2]);
    }
    (u, g)
}

/// fork(2). The caller must be single-threaded.
pub fn fork() -> io::Result<libc::pid_t> {
    // SAFETY: the jail forks before any thread exists (the CLI starts none before `jail`), so
    // the child's copy of every lock is consistent.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pid)
    }
}

pub fn pipe() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((fds[0], fds[1]))
}

pub fn close(fd: RawFd) {
    // SAFETY: closing a descriptor this code owns.
    unsafe { libc::close(fd) };
}

/// Reads one byte (blocking); false on end of file or error.
pub fn read_byte(fd: RawFd) -> bool {
    let mut b = 0u8;
    loop {
        // SAFETY: reads at most one byte into `b`.
        let n = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return n == 1;
    }
}

pub fn write_byte(fd: RawFd) -> io::Result<()> {
    let b = 1u8;
    // SAFETY: writes one byte from `b`.
    let n = unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    if n == 1 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn kill(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill takes integers; the pid is our own child.
    unsafe { libc::kill(pid, sig) };
}

/// A signal set of `signals`.
pub fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset, which initialises it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks (`how` = SIG_BLOCK) or unblocks (SIG_UNBLOCK) `set`.
pub fn sigmask(how: libc::c_int, set: &libc::sigset_t) {
    // SAFETY: a valid set; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(how, set, std::ptr::null_mut()) };
}

pub fn ignore_signal(sig: libc::c_int) {
    // SAFETY: SIG_IGN is a valid disposition.
    unsafe { libc::signal(sig, libc::SIG_IGN) };
}

/// Waits up to `ms` for a signal of `set`; None on timeout.
pub fn sigtimedwait(set: &libc::sigset_t, ms: u64) -> Option<libc::c_int> {
    let timeout = libc::timespec {
        tv_sec: (ms / 1000) as libc::time_t,
        tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: a valid set and timeout; no siginfo wanted.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
    (sig > 0).then_some(sig)
}

/// How a child ended, if it has.
pub fn try_wait(pid: libc::pid_t) -> io::Result<Option<libc::c_int>> {
    let mut status = 0;
    // SAFETY: `status` is a valid int; WNOHANG makes it non-blocking.
    let ret = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(None);
        }
        return Err(err);
    }
    Ok((ret == pid).then_some(status))
}

/// An exit status in the shell's terms: the code, or 128 + the signal that ended it.
pub fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// Detaches from the terminal and session: forks (the parent exits 0), `setsid`, stdio to
/// /dev/null.
pub fn daemonize() -> io::Result<()> {
    if fork()? != 0 {
        // SAFETY: the parent ends at once, running no destructors of state the child owns.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: no arguments.
    check(unsafe { libc::setsid() })?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors from a valid open file.
        check(unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) })?;
    }
    Ok(())
}

/// flock(LOCK_EX | LOCK_NB); false when another process holds it.
pub fn try_lock(fd: RawFd) -> io::Result<bool> {
    // SAFETY: flock on a valid descriptor.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

pub fn exit_now(code: i32) -> ! {
    // SAFETY: ends the process without unwinding or running the parent's atexit handlers.
    unsafe { libc::_exit(code) }
}
