//! A small builder for allowlists: which system calls a thread kind may make, some only with
//! given arguments, and the calls every thread of a Rust program makes (memory, locks, time,
//! logging to stderr, leaving the thread). The thread kinds' lists build on [`Rules::base`].

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// A condition on one argument, as `(index, operation, value)`; all of a rule's must hold.
pub type Cond = (u8, SeccompCmpOp, u64);

/// System calls and, for some, the argument patterns under which they are allowed.
#[derive(Debug, Default, Clone)]
pub struct Rules {
    /// `None`: any arguments. `Some(rules)`: only when one of the rules matches.
    calls: BTreeMap<i64, Option<Vec<Vec<Cond>>>>,
}

impl Rules {
    /// Allows `nr` with any arguments.
    pub fn allow(mut self, nr: i64) -> Self {
        self.calls.insert(nr, None);
        self
    }

    pub fn allow_all(self, nrs: &[i64]) -> Self {
        nrs.iter().fold(self, |rules, &nr| rules.allow(nr))
    }

    /// Allows `nr` when all of `conds` hold (in addition to patterns allowed before).
    pub fn allow_if(mut self, nr: i64, conds: &[Cond]) -> Self {
        match self.calls.entry(nr).or_insert_with(|| Some(Vec::new())) {
            // Already allowed with any arguments: nothing to narrow.
            None => {}
            // The same pattern twice (a kind's list and a shared piece) is one.
            Some(rules) if rules.iter().any(|r| r.as_slice() == conds) => {}
            Some(rules) => rules.push(conds.to_vec()),
        }
        self
    }

    /// Allows `ioctl` with each of `requests` (argument 1, compared as the 32 bits the kernel
    /// reads).
    pub fn ioctls(self, requests: &[u32]) -> Self {
        requests.iter().fold(self, |rules, &request| {
            rules.allow_if(
                libc::SYS_ioctl,
                &[(1, SeccompCmpOp::Eq, u64::from(request))],
            )
        })
    }

    /// `socket` and `socketpair` for Unix-domain sockets only.
    pub fn unix_sockets(self) -> Self {
        let unix = [(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)];
        self.allow_if(libc::SYS_socket, &unix)
            .allow_if(libc::SYS_socketpair, &unix)
    }

    /// Whether `nr` is allowed at all (with any or some arguments).
    pub fn allows(&self, nr: i64) -> bool {
        self.calls.contains_key(&nr)
    }

    /// What a thread of a Rust program needs whatever it does: memory (never executable),
    /// locks and condition variables, time, random seeds for hash maps, its signal mask and
    /// handlers' return, writing logs (and the violation message) to stderr, closing fds, and
    /// ending the thread or the process.
    pub fn base() -> Self {
        // No new executable memory: mmap and mprotect only without PROT_EXEC.
        let no_exec = [(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)];
        Rules::default()
            .allow_if(libc::SYS_mmap, &no_exec)
            .allow_if(libc::SYS_mprotect, &no_exec)
            .allow_all(&[
                libc::SYS_munmap,
                libc::SYS_mremap,
                libc::SYS_madvise,
                libc::SYS_brk,
                libc::SYS_futex,
                libc::SYS_sched_yield,
                libc::SYS_sched_getaffinity,
                libc::SYS_clock_gettime,
                libc::SYS_clock_nanosleep,
                libc::SYS_nanosleep,
                libc::SYS_gettid,
                libc::SYS_getpid,
                libc::SYS_getrandom,
                libc::SYS_rt_sigprocmask,
                libc::SYS_rt_sigreturn,
                libc::SYS_sigaltstack,
                libc::SYS_write,
                libc::SYS_writev,
                // Dropping an fd (std checks it is open in debug builds: F_GETFD).
                libc::SYS_close,
                libc::SYS_fcntl,
                libc::SYS_exit,
                libc::SYS_exit_group,
            ])
    }

    /// What printing a panic's backtrace needs (`RUST_BACKTRACE` set): the panicking thread
    /// reads the executable's debug information (read-only opens of existing files, their size,
    /// positioned reads and seeks, the link `/proc/self/exe`, the working directory).
    pub fn backtraces(self) -> Self {
        self.allow_if(
            libc::SYS_openat,
            &[
                (
                    2,
                    SeccompCmpOp::MaskedEq(libc::O_ACCMODE as u64),
                    libc::O_RDONLY as u64,
                ),
                (
                    2,
                    SeccompCmpOp::MaskedEq((libc::O_CREAT | libc::O_TMPFILE) as u64),
                    0,
                ),
            ],
        )
        .allow_all(&[
            libc::SYS_read,
            libc::SYS_pread64,
            libc::SYS_lseek,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_readlink,
            libc::SYS_readlinkat,
            libc::SYS_getcwd,
        ])
    }

    /// Starting threads (`std::thread::Builder::spawn`): the new thread's stack and its setup.
    pub fn spawn_threads(self) -> Self {
        self.allow_all(&[
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_prctl,
        ])
    }

    /// Splits off the calls a short hand-laid program can check (see `layout`): those allowed
    /// with any arguments, and those allowed when one argument, compared as 32 bits, is one of
    /// a set of values (ioctl requests, socket families). The rest stays for seccompiler.
    pub fn split_simple(self) -> SimpleSplit {
        let mut split = SimpleSplit::default();
        for (nr, patterns) in self.calls {
            match patterns {
                None => split.any_args.push(nr),
                Some(patterns) => match value_set(&patterns) {
                    Some((arg, values)) => split.value_sets.push(ValueSet { nr, arg, values }),
                    None => {
                        split.rest.calls.insert(nr, Some(patterns));
                    }
                },
            }
        }
        split
    }

    /// The rules in seccompiler's form.
    pub fn into_map(self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
        let mut map = BTreeMap::new();
        for (nr, patterns) in self.calls {
            let rules = match patterns {
                None => Vec::new(),
                Some(patterns) => patterns
                    .into_iter()
                    .map(|conds| {
                        let conds = conds
                            .into_iter()
                            .map(|(arg, op, value)| {
                                SeccompCondition::new(arg, arg_len(&op, value), op, value)
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(conds)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            map.insert(nr, rules);
        }
        Ok(map)
    }
}

/// A call allowed when argument `arg` (its low 32 bits, as the kernel reads an ioctl request
/// or a socket family) is one of `values`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueSet {
    pub nr: i64,
    pub arg: u8,
    pub values: Vec<u32>,
}

/// [`Rules::split_simple`]'s result.
#[derive(Debug, Default)]
pub struct SimpleSplit {
    /// Allowed with any arguments, in ascending order.
    pub any_args: Vec<i64>,
    pub value_sets: Vec<ValueSet>,
    /// Everything else (several conditions, masks, ranges, 64-bit values).
    pub rest: Rules,
}

/// `(arg, values)` when every pattern is a single 32-bit equality on the same argument: the
/// shape seccompiler compares as a `Dword` (low half only), so checking the low half here
/// means the same.
fn value_set(patterns: &[Vec<Cond>]) -> Option<(u8, Vec<u32>)> {
    let mut arg = None;
    let mut values = Vec::with_capacity(patterns.len());
    for pattern in patterns {
        let [(index, SeccompCmpOp::Eq, value)] = pattern.as_slice() else {
            return None;
        };
        if *arg.get_or_insert(*index) != *index {
            return None;
        }
        values.push(u32::try_from(*value).ok()?);
    }
    Some((arg?, values))
}

/// Values that fit 32 bits are compared as such (flags, request numbers, file descriptors).
fn arg_len(op: &SeccompCmpOp, value: u64) -> SeccompCmpArgLen {
    let mask = match op {
        SeccompCmpOp::MaskedEq(mask) => *mask,
        _ => 0,
    };
    if value <= u64::from(u32::MAX) && mask <= u64::from(u32::MAX) {
        SeccompCmpArgLen::Dword
    } else {
        SeccompCmpArgLen::Qword
    }
}
