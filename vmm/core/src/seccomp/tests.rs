//! Every filter compiles, and in a child process per thread kind an allowed call works while
//! `socket(AF_INET)` and `execve` end the process with the violation status and a message
//! naming the kind and the call.

use super::*;

fn options() -> [FilterOptions; 2] {
    [
        FilterOptions::default(),
        FilterOptions { vhost_vsock: true },
    ]
}

#[test]
fn every_filter_compiles_at_every_level() {
    for kind in ThreadKind::ALL {
        for opts in options() {
            for level in [SeccompLevel::Enforce, SeccompLevel::Log] {
                let program = program(kind, level, opts).unwrap();
                assert!(!program.is_empty(), "{kind:?} {level}");
                assert!(
                    program.len() < 4096,
                    "{kind:?}: {} instructions",
                    program.len()
                );
            }
            assert!(program(kind, SeccompLevel::Off, opts).unwrap().is_empty());
        }
    }
}

#[test]
fn traps_carry_the_thread_kind() {
    for kind in ThreadKind::ALL {
        let program = program(kind, SeccompLevel::Enforce, FilterOptions::default()).unwrap();
        let traps: Vec<u32> = program
            .iter()
            .filter(|i| i.code == BPF_RET_K && i.k & 0xffff_0000 == SECCOMP_RET_TRAP)
            .map(|i| i.k & 0xffff)
            .collect();
        assert!(!traps.is_empty(), "{kind:?}");
        assert!(
            traps.iter().all(|&id| id == u32::from(kind.id())),
            "{kind:?}"
        );
    }
}

#[test]
fn no_kind_may_execute_programs_or_open_internet_sockets() {
    for kind in ThreadKind::ALL {
        for opts in options() {
            let rules = allowlist(kind, opts);
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
                libc::SYS_process_vm_writev,
            ] {
                assert!(!rules.allows(nr), "{kind:?} allows {nr}");
            }
        }
    }
    // Only the threads that need them may open files or sockets (without backtraces, which
    // add read-only opens everywhere: see `allowlist`).
    let plain = |kind| kind_allowlist(kind, FilterOptions::default());
    assert!(!plain(ThreadKind::Devices).allows(libc::SYS_openat));
    assert!(!plain(ThreadKind::Vcpu).allows(libc::SYS_openat));
    assert!(!plain(ThreadKind::Vcpu).allows(libc::SYS_socket));
    // Only the store fetchers may open internet sockets.
    for kind in ThreadKind::ALL {
        if kind != ThreadKind::StoreFetch {
            let rules = plain(kind);
            let split = rules.split_simple();
            let inet_allowed = split.any_args.contains(&libc::SYS_socket)
                || split.value_sets.iter().any(|set| {
                    set.nr == libc::SYS_socket && set.values.contains(&(libc::AF_INET as u32))
                });
            assert!(!inet_allowed, "{kind:?} may open AF_INET sockets");
        }
    }
    assert!(
        !plain(ThreadKind::StoreFetch).allows(libc::SYS_ioctl) || {
            // Its ioctls are userfaultfd's and FIONBIO only: never KVM's.
            let split = plain(ThreadKind::StoreFetch).split_simple();
            split
                .value_sets
                .iter()
                .filter(|s| s.nr == libc::SYS_ioctl)
                .all(|s| {
                    s.values.iter().all(|v| {
                        snapshot::USERFAULTFD_IOCTLS.iter().any(|u| *u as u32 == *v)
                            || *v == libc::FIONBIO as u32
                    })
                })
        }
    );
}

#[test]
fn vcpu_threads_may_yield_to_the_thread_that_started_them() {
    // A prespawned vCPU thread yields once after saying it runs (hypervisor::vcpu::prespawn).
    let vcpu = kind_allowlist(ThreadKind::Vcpu, FilterOptions::default());
    assert!(vcpu.allows(libc::SYS_sched_yield));
}

#[test]
fn live_snapshot_threads_write_and_unprotect_but_open_nothing() {
    let writer = kind_allowlist(ThreadKind::SnapshotWriter, FilterOptions::default());
    for nr in [
        libc::SYS_pwrite64,
        libc::SYS_read,
        libc::SYS_ppoll,
        libc::SYS_ioctl,
    ] {
        assert!(writer.allows(nr), "snapshot-writer must allow {nr}");
    }
    for nr in [
        libc::SYS_openat,
        libc::SYS_socket,
        libc::SYS_userfaultfd,
        libc::SYS_clone3,
        libc::SYS_unlinkat,
    ] {
        assert!(!writer.allows(nr), "snapshot-writer must not allow {nr}");
    }
    let ioctls = |rules: &Rules| -> Vec<u32> {
        rules
            .clone()
            .split_simple()
            .value_sets
            .iter()
            .filter(|s| s.nr == libc::SYS_ioctl)
            .flat_map(|s| s.values.clone())
            .collect()
    };
    // Only userfaultfd's ioctls: never KVM's.
    let writer_ioctls = ioctls(&writer);
    assert!(!writer_ioctls.is_empty());
    assert!(writer_ioctls
        .iter()
        .all(|v| snapshot::USERFAULTFD_IOCTLS.iter().any(|u| *u as u32 == *v)));
    // The API thread that starts them creates the userfaultfd and protects memory.
    let api = kind_allowlist(ThreadKind::Api, FilterOptions::default());
    assert!(api.allows(libc::SYS_userfaultfd));
    // The threads install their own filter on top of the API's.
    assert!(api.allows(libc::SYS_seccomp));
    let api_ioctls = ioctls(&api);
    assert!(snapshot::USERFAULTFD_IOCTLS
        .iter()
        .all(|u| api_ioctls.contains(&(*u as u32))));
}

#[test]
fn levels_parse_and_print() {
    for level in [SeccompLevel::Enforce, SeccompLevel::Log, SeccompLevel::Off] {
        assert_eq!(level.as_str().parse::<SeccompLevel>().unwrap(), level);
    }
    assert!("strict".parse::<SeccompLevel>().is_err());
    assert_eq!(SeccompLevel::default(), SeccompLevel::Enforce);
}

/// What a forked child did: its wait status and what it wrote to stderr.
struct ChildOutcome {
    status: libc::c_int,
    stderr: String,
}

/// Forks a child that installs `program` (compiled here, before the fork: the child only makes
/// system calls), runs `body` and exits 0 if it returns.
fn in_child(program: &BpfProgram, body: fn()) -> ChildOutcome {
    let mut pipe = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    assert_eq!(
        unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) },
        0
    );
    handler::install_once().unwrap();
    // SAFETY: the child only makes system calls (dup2, prctl, seccomp, the body's raw calls)
    // and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            libc::dup2(pipe[1], libc::STDERR_FILENO);
            if seccompiler::apply_filter(program).is_err() {
                libc::_exit(3);
            }
            body();
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end; reading into a local buffer; waiting for our
    // own child.
    unsafe {
        libc::close(pipe[1]);
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            let n = libc::read(pipe[0], buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        libc::close(pipe[0]);
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        ChildOutcome {
            status,
            stderr: String::from_utf8_lossy(&out).into_owned(),
        }
    }
}

fn allowed_call() {
    // SAFETY: getppid has no arguments; every kind allows it or getpid.
    unsafe {
        if libc::syscall(libc::SYS_getppid) <= 0 {
            libc::_exit(4);
        }
    }
}

fn inet_socket() {
    // SAFETY: a plain system call; the filter stops it.
    unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
    // SAFETY: _exit ends the child; reaching it means the call was let through.
    unsafe { libc::_exit(5) };
}

fn ptrace_me() {
    // SAFETY: a plain system call; the filter stops it.
    unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) };
    // SAFETY: _exit ends the child; reaching it means the call was let through.
    unsafe { libc::_exit(5) };
}

fn exec_shell() {
    let path = c"/bin/sh";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    // SAFETY: valid NUL-terminated path and null-terminated argv/envp arrays.
    unsafe {
        libc::syscall(
            libc::SYS_execve,
            path.as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
        );
        libc::_exit(5);
    }
}

fn exited_with(outcome: &ChildOutcome, code: i32) -> bool {
    libc::WIFEXITED(outcome.status) && libc::WEXITSTATUS(outcome.status) == code
}

#[test]
fn each_kind_allows_its_calls_and_a_forbidden_call_ends_the_process_naming_the_kind() {
    for kind in ThreadKind::ALL {
        let program = program(kind, SeccompLevel::Enforce, FilterOptions::default()).unwrap();
        // Teardown's list has getppid; the others have getpid and futex (and getppid is not
        // in them): use a call each list has.
        let allowed: fn() = if kind == ThreadKind::Teardown || kind == ThreadKind::Main {
            allowed_call
        } else {
            || {
                // SAFETY: gettid has no arguments and is in every list but Teardown's.
                unsafe { libc::syscall(libc::SYS_gettid) };
            }
        };
        let fine = in_child(&program, allowed);
        assert!(
            exited_with(&fine, 0),
            "{kind:?}: {:#x} {}",
            fine.status,
            fine.stderr
        );
        assert!(fine.stderr.is_empty(), "{kind:?}: {}", fine.stderr);

        // The store fetchers reach S3 over TCP: for them a ptrace is the forbidden call.
        let second = if kind == ThreadKind::StoreFetch {
            (ptrace_me as fn(), libc::SYS_ptrace, "ptrace")
        } else {
            (inet_socket as fn(), libc::SYS_socket, "socket")
        };
        for (body, nr, name) in [second, (exec_shell as fn(), libc::SYS_execve, "execve")] {
            let outcome = in_child(&program, body);
            assert!(
                exited_with(&outcome, VIOLATION_EXIT_STATUS),
                "{kind:?} {name}: status {:#x}, stderr {}",
                outcome.status,
                outcome.stderr
            );
            let expected = format!(
                "{VIOLATION_PREFIX}{} called syscall {nr} ({name})",
                kind.name()
            );
            assert!(
                outcome.stderr.starts_with(&expected),
                "{kind:?}: {:?} does not start with {expected:?}",
                outcome.stderr
            );
        }
    }
}

#[test]
fn log_level_lets_a_forbidden_call_through() {
    let program = program(
        ThreadKind::Vcpu,
        SeccompLevel::Log,
        FilterOptions::default(),
    )
    .unwrap();
    let outcome = in_child(&program, || {
        // SAFETY: plain system calls on a fresh fd.
        unsafe {
            let fd = libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
            if fd < 0 {
                libc::_exit(6);
            }
            libc::syscall(libc::SYS_close, fd);
        }
    });
    assert!(
        exited_with(&outcome, 0),
        "{:#x} {}",
        outcome.status,
        outcome.stderr
    );
}

#[test]
fn install_off_does_nothing() {
    install(ThreadKind::Vcpu, SeccompLevel::Off).unwrap();
    // Still unfiltered: this thread may do anything a test does.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0");
    assert!(socket.is_ok());
}

/// What the metrics thread does, with raw calls: sleep, take an uncontended lock (a futex
/// wake), write a line to an fd it was handed (stdout here) and read the clock.
fn metrics_flush_body() {
    let pause = libc::timespec {
        tv_sec: 0,
        tv_nsec: 1_000_000,
    };
    let mut word = 0u32;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointers to locals; a zero-length write to stdout writes nothing.
    unsafe {
        if libc::syscall(
            libc::SYS_clock_nanosleep,
            libc::CLOCK_MONOTONIC,
            0,
            &pause,
            std::ptr::null_mut::<libc::timespec>(),
        ) != 0
        {
            libc::_exit(6);
        }
        libc::syscall(
            libc::SYS_futex,
            &mut word,
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        );
        if libc::syscall(libc::SYS_write, libc::STDOUT_FILENO, b"".as_ptr(), 0) < 0 {
            libc::_exit(7);
        }
        libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_REALTIME, &mut now);
    }
}

#[test]
fn the_metrics_thread_may_sleep_and_write_but_not_open_files() {
    let program = program(
        ThreadKind::Metrics,
        SeccompLevel::Enforce,
        FilterOptions::default(),
    )
    .unwrap();
    let fine = in_child(&program, metrics_flush_body);
    assert!(exited_with(&fine, 0), "{:#x} {}", fine.status, fine.stderr);
    // The file is opened before the thread starts: opening one for writing here is a
    // violation (a read-only open is let through when backtraces are on).
    let open = in_child(&program, || {
        // SAFETY: a plain system call with a valid path; the filter stops it.
        unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/tmp/dormouse-metrics-seccomp-test".as_ptr(),
                libc::O_WRONLY | libc::O_CREAT,
                0o600,
            );
            libc::_exit(5);
        }
    });
    assert!(
        exited_with(&open, VIOLATION_EXIT_STATUS),
        "{:#x} {}",
        open.status,
        open.stderr
    );
    assert!(
        open.stderr.contains("thread metrics called syscall"),
        "{}",
        open.stderr
    );
}

/// The balloon releases guest memory on the devices thread (`madvise`: MADV_REMOVE, then
/// MADV_DONTNEED on memory that is not a shared file mapping).
fn balloon_discard() {
    use ::devices::virtio::balloon::{discard, PageRange};
    use vm_memory::{Bytes, GuestAddress};
    let exit = |code| {
        // SAFETY: ends the child at once with a status the parent checks.
        unsafe { libc::_exit(code) }
    };
    let Ok(mem) = ::devices::GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]) else {
        exit(5)
    };
    if mem.write_obj(0x5au8, GuestAddress(0x1000)).is_err() {
        exit(6);
    }
    if discard(
        &mem,
        PageRange {
            gpa: 0,
            len: 0x2000,
        },
    )
    .ok()
        != Some(0x2000)
    {
        exit(7);
    }
    if mem.read_obj::<u8>(GuestAddress(0x1000)).ok() != Some(0) {
        exit(8);
    }
}

#[test]
fn the_devices_thread_may_release_guest_memory_for_the_balloon() {
    let program = program(
        ThreadKind::Devices,
        SeccompLevel::Enforce,
        FilterOptions::default(),
    )
    .unwrap();
    let outcome = in_child(&program, balloon_discard);
    assert!(
        exited_with(&outcome, 0),
        "status {:#x}, stderr {}",
        outcome.status,
        outcome.stderr
    );
}

/// The MMDS on the devices thread: a V2 token (getrandom) and the responder answering a guest
/// frame (smoltcp: memory and the clock only).
fn mmds_token_and_frame() {
    use ::devices::mmds::{Responder, SharedMmds, DEFAULT_IPV4};
    let exit = |code| {
        // SAFETY: ends the child at once with a status the parent checks.
        unsafe { libc::_exit(code) }
    };
    let shared = SharedMmds::default();
    let mut responder = Responder::new(DEFAULT_IPV4, shared.clone());
    if shared
        .lock()
        .tokens
        .generate(60, std::time::Instant::now())
        .is_err()
    {
        exit(5);
    }
    // An ARP request for the MMDS from 02:00:00:00:00:01 at 169.254.0.2.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 169, 254, 0, 2, 0, 0, 0, 0, 0, 0]);
    arp.extend_from_slice(&DEFAULT_IPV4.octets());
    responder.receive(&arp);
    if responder.pop_frame().is_none() {
        exit(6);
    }
}

#[test]
fn the_devices_thread_may_serve_the_mmds() {
    let program = program(
        ThreadKind::Devices,
        SeccompLevel::Enforce,
        FilterOptions::default(),
    )
    .unwrap();
    let outcome = in_child(&program, mmds_token_and_frame);
    assert!(
        exited_with(&outcome, 0),
        "status {:#x}, stderr {}",
        outcome.status,
        outcome.stderr
    );
}
