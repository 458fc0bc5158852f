//! A throw-away network namespace for the TAP benchmark, managed with iproute2 (`ip netns`), so
//! nothing the benchmark does touches the host's own interfaces. Needs root.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use crate::BenchError;

/// Deletes namespaces named `<prefix><pid>` whose process is gone: left behind by benchmark
/// runs that were killed before they could clean up.
pub fn remove_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = quiet(Command::new("ip").args(["netns", "del", &name]));
        }
    }
}

/// A named namespace (`/run/netns/<name>`), deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace (replacing a stale one of the same name) with `lo` up.
    pub fn create(name: &str) -> Result<Self, BenchError> {
        // A namespace left over by a killed earlier run would make `add` fail.
        let _ = quiet(Command::new("ip").args(["netns", "del", name]));
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<(), BenchError> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `f` on a thread that has joined the namespace: sockets and TAP interfaces it
    /// creates belong to the namespace, and their fds keep working from any thread.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, BenchError> {
        let path = format!("/run/netns/{}", self.name);
        let ns = File::open(&path).map_err(BenchError::io(format!("opening {path}")))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns only reads the fd, a valid namespace fd we own; CLONE_NEWNET
                // moves just this (short-lived) thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(BenchError::io(format!("joining {path}"))(
                        std::io::Error::last_os_error(),
                    ));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| BenchError::Check("a thread in the namespace panicked".into()))?
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            tracing::warn!("removing network namespace {}: {e}", self.name);
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), BenchError> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(BenchError::io(format!("running {what}")))?;
    if !out.status.success() {
        return Err(BenchError::Setup {
            what: "network namespace",
            why: format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

fn quiet(cmd: &mut Command) -> std::io::Result<std::process::ExitStatus> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

/// Whether this process may create namespaces and TAPs.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
