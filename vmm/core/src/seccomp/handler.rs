//! The SIGSYS handler behind `SeccompLevel::Enforce`: a trapped call ends the process with a
//! message saying which kind of thread made which call. It runs in a signal handler (and in
//! the teardown helper, a process sharing the main thread's memory and thread pointer), so it
//! only formats into a buffer on its stack and makes raw `write` and `exit_group` calls, both
//! in every allowlist.

use std::sync::Once;

use super::{names, ThreadKind};

/// The exit status of a process a violation ended (128 + SIGSYS, like a death by SIGSYS as a
/// shell reports it).
pub const VIOLATION_EXIT_STATUS: i32 = 128 + libc::SIGSYS;
/// The start of the message a violation writes to stderr.
pub const VIOLATION_PREFIX: &str = "dormouse: seccomp violation: thread ";

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: i32 = 1;
/// Offset of `si_syscall` in `siginfo_t` on x86_64 (`_sigsys`: a pointer, then the number).
const SI_SYSCALL_OFFSET: usize = 24;

static INSTALLED: Once = Once::new();

/// Installs the handler once per process.
pub(super) fn install_once() -> std::io::Result<()> {
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe (see the module
        // comment) and has the SA_SIGINFO signature.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
                result = Err(std::io::Error::last_os_error());
            }
        }
    });
    result
}

/// A fixed buffer the message is formatted into (no allocation in a signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_dec(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn push_hex(&mut self, mut value: u64) {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(value & 0xf) as usize];
            value >>= 4;
            if value == 0 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[i..]);
    }
}

/// The message for a trapped call `nr` (with its first three arguments) by a thread of kind
/// `kind_id` (the filter's return data).
fn message(kind_id: u16, nr: i64, args: [u64; 3]) -> Line {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(VIOLATION_PREFIX.as_bytes());
    match ThreadKind::from_id(kind_id) {
        Some(kind) => line.push(kind.name().as_bytes()),
        None => line.push(b"unknown"),
    }
    line.push(b" called syscall ");
    line.push_dec(nr as u64);
    if let Some(name) = names::name(nr) {
        line.push(b" (");
        line.push(name.as_bytes());
        line.push(b")");
    }
    line.push(b" with arguments ");
    for (i, arg) in args.into_iter().enumerate() {
        if i > 0 {
            line.push(b", ");
        }
        line.push_hex(arg);
    }
    line.push(b"\n");
    line
}

extern "C" fn on_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo and ucontext to an SA_SIGINFO handler; for a
    // seccomp SIGSYS `si_syscall` is at SI_SYSCALL_OFFSET (checked by a test against a real
    // trap) and the registers hold the call's arguments.
    unsafe {
        let (kind_id, nr, args) = if info.is_null() || (*info).si_code != SYS_SECCOMP {
            (0, -1, [0; 3])
        } else {
            let nr = info
                .cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<libc::c_int>()
                .read_unaligned();
            let args = if context.is_null() {
                [0; 3]
            } else {
                let regs = &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
                [
                    regs[libc::REG_RDI as usize] as u64,
                    regs[libc::REG_RSI as usize] as u64,
                    regs[libc::REG_RDX as usize] as u64,
                ]
            };
            ((*info).si_errno as u16, i64::from(nr), args)
        };
        let line = message(kind_id, nr, args);
        libc::syscall(
            libc::SYS_write,
            libc::STDERR_FILENO,
            line.buf.as_ptr(),
            line.len,
        );
        libc::syscall(libc::SYS_exit_group, VIOLATION_EXIT_STATUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_kind_the_call_and_its_arguments() {
        let line = message(ThreadKind::Vcpu.id(), 41, [2, 1, 0]);
        assert_eq!(
            std::str::from_utf8(&line.buf[..line.len]).unwrap(),
            "dormouse: seccomp violation: thread vcpu called syscall 41 (socket) with \
             arguments 0x2, 0x1, 0x0\n"
        );
        let line = message(99, 9999, [u64::MAX, 0, 0]);
        assert_eq!(
            std::str::from_utf8(&line.buf[..line.len]).unwrap(),
            "dormouse: seccomp violation: thread unknown called syscall 9999 with arguments \
             0xffffffffffffffff, 0x0, 0x0\n"
        );
    }
}
