//! Ending the process without waiting for KVM to tear its VM down.
//!
//! When the last reference to a VM fd goes, KVM destroys the VM in the closing task: it waits
//! for SRCU grace periods (and for the PIT's kernel thread, if any), several milliseconds to
//! tens of milliseconds on some hosts, and the guest memory is unmapped. A process that simply
//! exits does this in its exit path, so whoever waits for the process waits for the teardown.
//!
//! [`exit_leaving_teardown`] has a helper process do that work instead. The helper shares this
//! process's memory (`CLONE_VM`: nothing is copied, the guest memory stays mapped through it) and
//! gets its own copy of the fd table, in which it closes everything but the fds it is asked to
//! keep (the VM's), so the console pipe, TAPs, disks and sockets are released when this process
//! exits, as before. It then waits for this process to die (`PR_SET_PDEATHSIG`) and exits,
//! which releases the VM and its memory with nobody waiting.
//!
//! The helper runs under seccomp: it inherits the filter of the thread that starts it (the
//! CLI's main thread) and installs its own, the `teardown` allowlist, as its first act (raw
//! `prctl` and `seccomp` calls on a program compiled before the `clone`), before it closes
//! anything or waits.

use std::os::fd::RawFd;

use crate::seccomp::{FilterOptions, SeccompLevel, ThreadKind};

/// Stack of the helper: it only makes a few system calls.
const HELPER_STACK: usize = 64 << 10;

struct HelperArgs {
    /// Fds the helper keeps open, ascending.
    keep: Vec<RawFd>,
    parent: libc::pid_t,
    /// The helper's seccomp filter, installed before anything else (`None`: no filter).
    filter: Option<libc::sock_fprog>,
    /// Test builds: crash at once (`crate::fault::FaultThread::Teardown`).
    #[cfg(any(test, feature = "fault-injection"))]
    crash: bool,
    /// Test builds: make the forbidden system call once filtered.
    #[cfg(any(test, feature = "fault-injection"))]
    forbidden_call: bool,
}

// SAFETY: the filter pointer refers to a leaked, never-modified program.
unsafe impl Sync for HelperArgs {}
// SAFETY: as above.
unsafe impl Send for HelperArgs {}

/// Exits the process with `code`, leaving the KVM teardown of the fds in `keep` (and of the
/// memory mappings) to a helper process. Falls back to a plain exit if the helper cannot be
/// started. Rust's stdout is flushed as by `std::process::exit`. The helper runs under the
/// `teardown` seccomp filter at `seccomp`.
pub fn exit_leaving_teardown(keep: &[RawFd], code: i32, seccomp: SeccompLevel) -> ! {
    if let Err(e) = spawn_helper(keep, seccomp) {
        tracing::debug!("exiting with the VM teardown in this process: {e}");
    }
    std::process::exit(code)
}

/// The helper's filter program, leaked (the helper may use it after this process is gone).
fn helper_filter(seccomp: SeccompLevel) -> std::io::Result<Option<libc::sock_fprog>> {
    if seccomp == SeccompLevel::Off {
        return Ok(None);
    }
    let program = crate::seccomp::prepare(seccomp)
        .and_then(|()| {
            crate::seccomp::program(ThreadKind::Teardown, seccomp, FilterOptions::default())
        })
        .map_err(std::io::Error::other)?;
    let len = u16::try_from(program.len()).map_err(std::io::Error::other)?;
    let program: &'static mut [seccompiler::sock_filter] = program.leak();
    Ok(Some(libc::sock_fprog {
        len,
        // seccompiler's sock_filter is the kernel's struct, field for field.
        filter: program.as_mut_ptr().cast(),
    }))
}

fn spawn_helper(keep: &[RawFd], seccomp: SeccompLevel) -> std::io::Result<()> {
    // Before anything is opened: a filter that cannot be built means no helper.
    let filter = helper_filter(seccomp)?;
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|fd| *fd >= 0).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let [ready_read, ready_write] = pipe;
    // SAFETY: a fresh anonymous mapping; it is never unmapped (the helper runs on it until it
    // exits, after this process is gone).
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            HELPER_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        close_pair(ready_read, ready_write);
        return Err(e);
    }
    // Leaked: the helper may read it after this function returns.
    let args: &'static HelperArgs = Box::leak(Box::new(HelperArgs {
        keep,
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        filter,
        #[cfg(any(test, feature = "fault-injection"))]
        crash: crate::fault::teardown_fault_armed(),
        #[cfg(any(test, feature = "fault-injection"))]
        forbidden_call: crate::fault::teardown_syscall_armed(),
    }));
    // SAFETY: the helper runs `helper_main` on its own stack (the top of `stack`; stacks grow
    // down) in this address space, with a copy of the fd table; `args` lives forever. It makes
    // raw system calls only (no allocation, no locks, no unwinding).
    let pid = unsafe {
        libc::clone(
            helper_main,
            stack.cast::<u8>().add(HELPER_STACK).cast(),
            libc::CLONE_VM | libc::SIGCHLD,
            std::ptr::from_ref(args).cast_mut().cast(),
        )
    };
    let spawned = if pid < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    };
    // SAFETY: closing our own pipe end.
    unsafe { libc::close(ready_write) };
    if spawned.is_ok() {
        // EOF once the helper has closed its copies of our fds (its copy of `ready_write`
        // among them): from then on only the kept fds outlive this process.
        let mut byte = 0u8;
        // SAFETY: reading one byte into a local from our own pipe end.
        while unsafe { libc::read(ready_read, std::ptr::from_mut(&mut byte).cast(), 1) } < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
    }
    // SAFETY: closing our own pipe end.
    unsafe { libc::close(ready_read) };
    spawned
}

fn close_pair(a: RawFd, b: RawFd) {
    // SAFETY: closing fds this module opened.
    unsafe {
        libc::close(a);
        libc::close(b);
    }
}

/// The helper: arrange to die with the parent, close all fds but the kept ones, then wait.
/// It shares the parent's memory and thread pointer, so it uses raw system calls only.
extern "C" fn helper_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the leaked `HelperArgs` from `spawn_helper`.
    let args: &HelperArgs = unsafe { &*arg.cast::<HelperArgs>() };
    if let Some(filter) = &args.filter {
        // SAFETY: raw system calls; `filter` points at a leaked program of `len` instructions.
        // A helper that cannot filter itself exits at once (the parent then exits the slow way).
        unsafe {
            if libc::syscall(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    std::ptr::from_ref(filter),
                ) != 0
            {
                return 0;
            }
        }
    }
    #[cfg(any(test, feature = "fault-injection"))]
    if args.forbidden_call {
        crate::fault::forbidden_syscall();
    }
    #[cfg(any(test, feature = "fault-injection"))]
    if args.crash {
        // SIGABRT, not SIGSEGV: the helper shares the parent's handlers, and Rust's SIGSEGV
        // handler (stack-overflow detection) would swallow a sent signal.
        // SAFETY: raw system calls; the signal ends this helper process only (no CLONE_THREAD).
        unsafe {
            libc::syscall(
                libc::SYS_kill,
                libc::syscall(libc::SYS_getpid),
                libc::SIGABRT,
            )
        };
    }
    // Before closing anything: the parent waits for our close (EOF on its pipe), so it is
    // still alive here and its death will reach us.
    // SAFETY: plain system calls without memory arguments.
    unsafe {
        libc::syscall(
            libc::SYS_prctl,
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
        );
        if libc::syscall(libc::SYS_getppid) != libc::c_long::from(args.parent) {
            return 0;
        }
    }
    let mut next: libc::c_uint = 0;
    for &fd in &args.keep {
        let fd = fd as libc::c_uint;
        if fd > next {
            close_range(next, fd - 1);
        }
        next = fd.saturating_add(1);
    }
    if !close_range(next, libc::c_uint::MAX) {
        // No close_range (Linux < 5.9): exit now, which closes everything (the parent then
        // sees EOF and exits the slow way).
        return 0;
    }
    loop {
        // SAFETY: pause has no arguments; SIGKILL ends us.
        unsafe { libc::syscall(libc::SYS_pause) };
    }
}

fn close_range(first: libc::c_uint, last: libc::c_uint) -> bool {
    // SAFETY: close_range only closes fds of this (the helper's own) fd table.
    unsafe { libc::syscall(libc::SYS_close_range, first, last, 0 as libc::c_uint) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn read_is_eof(fd: RawFd) -> bool {
        let mut byte = 0u8;
        // SAFETY: reading one byte into a local.
        unsafe { libc::read(fd, std::ptr::from_mut(&mut byte).cast(), 1) == 0 }
    }

    /// Process A (a subreaper, so the orphaned helper becomes its child) forks B, which exits
    /// through `exit_leaving_teardown`. B's exit status comes through; B's other fds close with
    /// it; the helper held the kept fd until B died, was then killed by SIGKILL, and the kept
    /// fd closed with it. A reports through its exit status, so the test runner is untouched.
    #[test]
    fn helper_holds_only_the_kept_fds_until_the_process_is_gone() {
        let (kept_read, kept_write) = std::io::pipe().unwrap();
        let (other_read, other_write) = std::io::pipe().unwrap();
        // SAFETY: the forked processes only make system calls and exit with `_exit`.
        let a = unsafe { libc::fork() };
        assert!(a >= 0);
        if a == 0 {
            // SAFETY: as above; the codes below say which check failed.
            unsafe {
                libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
                let b = libc::fork();
                if b == 0 {
                    drop(kept_read);
                    drop(other_read);
                    exit_leaving_teardown(&[kept_write.as_raw_fd()], 7, SeccompLevel::Enforce);
                }
                drop(kept_write);
                drop(other_write);
                let mut status = 0;
                if libc::waitpid(b, &mut status, 0) != b
                    || !libc::WIFEXITED(status)
                    || libc::WEXITSTATUS(status) != 7
                {
                    libc::_exit(10);
                }
                if !read_is_eof(other_read.as_raw_fd()) {
                    libc::_exit(11);
                }
                let helper = libc::waitpid(-1, &mut status, 0);
                if helper <= 0 || helper == b {
                    libc::_exit(12);
                }
                if !libc::WIFSIGNALED(status) || libc::WTERMSIG(status) != libc::SIGKILL {
                    libc::_exit(13);
                }
                if !read_is_eof(kept_read.as_raw_fd()) {
                    libc::_exit(14);
                }
                libc::_exit(0);
            }
        }
        drop((kept_read, kept_write, other_read, other_write));
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(a, &mut status, 0) }, a);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "failed check (see the test)");
    }

    /// A process armed with `arm` exits with 7 through `exit_leaving_teardown`: its status
    /// still comes through, its helper ends as `helper_ended_right` expects, and the kept fd
    /// closes with the helper.
    fn helper_fault_case(arm: fn(), helper_ended_right: fn(libc::c_int) -> bool) {
        let (kept_read, kept_write) = std::io::pipe().unwrap();
        // SAFETY: the forked processes only make system calls and exit with `_exit`.
        let a = unsafe { libc::fork() };
        assert!(a >= 0);
        if a == 0 {
            // SAFETY: as above; the codes below say which check failed.
            unsafe {
                libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
                let b = libc::fork();
                if b == 0 {
                    drop(kept_read);
                    arm();
                    exit_leaving_teardown(&[kept_write.as_raw_fd()], 7, SeccompLevel::Enforce);
                }
                drop(kept_write);
                let mut status = 0;
                if libc::waitpid(b, &mut status, 0) != b
                    || !libc::WIFEXITED(status)
                    || libc::WEXITSTATUS(status) != 7
                {
                    libc::_exit(10);
                }
                let helper = libc::waitpid(-1, &mut status, 0);
                if helper <= 0 || helper == b {
                    libc::_exit(12);
                }
                if !helper_ended_right(status) {
                    libc::_exit(13);
                }
                if !read_is_eof(kept_read.as_raw_fd()) {
                    libc::_exit(14);
                }
                libc::_exit(0);
            }
        }
        drop((kept_read, kept_write));
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(a, &mut status, 0) }, a);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "failed check (see the test)");
    }

    /// A helper that crashes at once (fault injection) changes nothing for the exiting process:
    /// its exit status still comes through, nothing hangs, and the kept fd closes with the
    /// crashed helper.
    #[test]
    fn a_crashing_helper_does_not_change_the_exit() {
        helper_fault_case(crate::fault::arm_teardown_fault, |status| {
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGABRT
        });
    }

    /// The helper filters itself: a call outside the `teardown` allowlist ends the helper with
    /// the violation status (the exiting process's status is untouched).
    #[test]
    fn a_forbidden_call_in_the_helper_ends_it_with_the_violation_status() {
        helper_fault_case(crate::fault::arm_teardown_syscall, |status| {
            libc::WIFEXITED(status)
                && libc::WEXITSTATUS(status) == crate::seccomp::VIOLATION_EXIT_STATUS
        });
    }
}
