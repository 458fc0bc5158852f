//! Why a sandbox process ended, in one line: its exit status or signal and the last line it
//! wrote to stderr (e.g. `dormouse: seccomp violation: thread vcpu called syscall 41 …`).

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

use crate::log_text::{self, strip_ansi};

/// What `dormouse run`/`restore` prints last when the guest kernel panicked (vmm/cli's
/// `run.rs`); its exit status is then 1, like a VMM failure's.
pub(crate) const GUEST_PANIC_LINE: &str = "dormouse: the guest kernel panicked";

/// How much of the end of the stderr file is read.
const TAIL_BYTES: u64 = 8 * 1024;

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGSYS => "SIGSYS",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// The line that best explains an exit: the last `dormouse: …` line (the CLI's own verdicts:
/// seccomp violations, `VM failed`, errors), else the last non-empty line.
pub(crate) fn telling_line(stderr: &str) -> Option<String> {
    let lines: Vec<String> = stderr
        .lines()
        .map(|l| strip_ansi(l).trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .iter()
        .rev()
        .find(|l| l.starts_with("dormouse:") || l.starts_with("Error:"))
        .or(lines.last())
        .cloned()
}

/// The end of the process's stderr file (lossy UTF-8; empty when unreadable).
pub(crate) fn read_tail(path: &Path) -> String {
    String::from_utf8_lossy(&log_text::read_tail(path, TAIL_BYTES)).into_owned()
}

/// `"dormouse process exited with status 159: dormouse: seccomp violation: …"`,
/// `"dormouse process killed by signal 9 (SIGKILL)"`, ….
pub(crate) fn describe(status: ExitStatus, stderr_tail: &str) -> String {
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("dormouse process exited with status {code}"),
        (None, Some(signal)) => format!(
            "dormouse process killed by signal {signal} ({})",
            signal_name(signal)
        ),
        (None, None) => format!("dormouse process ended ({status})"),
    };
    match telling_line(stderr_tail) {
        Some(line) => format!("{how}: {line}"),
        None => how,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seccomp_violation_is_named() {
        let stderr = "\u{1b}[2m2026-01-01\u{1b}[0m INFO restored\n\
                      dormouse: seccomp violation: thread vcpu called syscall 41 (socket) with arguments 0x2, 0x1, 0x0\n";
        let reason = describe(ExitStatus::from_raw(159 << 8), stderr);
        assert_eq!(
            reason,
            "dormouse process exited with status 159: dormouse: seccomp violation: thread vcpu \
             called syscall 41 (socket) with arguments 0x2, 0x1, 0x0"
        );
    }

    #[test]
    fn signals_and_plain_last_lines() {
        let reason = describe(ExitStatus::from_raw(libc::SIGKILL), "INFO running\n\n");
        assert_eq!(
            reason,
            "dormouse process killed by signal 9 (SIGKILL): INFO running"
        );
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGKILL), ""),
            "dormouse process killed by signal 9 (SIGKILL)"
        );
        let stderr = "dormouse: VM failed: vcpu0 thread panicked: boom\nINFO teardown\n";
        assert_eq!(
            telling_line(stderr).unwrap(),
            "dormouse: VM failed: vcpu0 thread panicked: boom"
        );
        assert_eq!(strip_ansi("\u{1b}[31mred\u{1b}[0m x"), "red x");
    }

    #[test]
    fn tail_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr");
        let mut text = "x".repeat(20_000);
        text.push_str("\nlast words\n");
        std::fs::write(&path, &text).unwrap();
        let tail = read_tail(&path);
        assert!(tail.len() <= TAIL_BYTES as usize);
        assert_eq!(telling_line(&tail).unwrap(), "last words");
        assert_eq!(read_tail(&dir.path().join("missing")), "");
    }
}
