//! Peer VMM processes: killed on drop, their console watched for a marker, their RSS read.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process killed (and reaped) when dropped: no peer outlives a failed step.
pub struct Reaped(pub Child);

impl Reaped {
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
        // If the bench itself is killed (no destructor runs), the peer dies with it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
            .map(Reaped)
            .with_context(|| format!("spawning {program}"))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Fails with the exit status if the process has already ended.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.0.try_wait() {
            Ok(Some(status)) => bail!("the process ended: {status}"),
            Ok(None) => Ok(()),
            Err(e) => Err(e).context("waiting on the process"),
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Takes the child's stdout (its serial console) and waits until `marker` appears, then keeps
/// draining it in the background (a guest blocks when nobody reads its console).
pub fn wait_for_console(
    child: &mut Reaped,
    marker: &[u8],
    timeout: Duration,
) -> anyhow::Result<()> {
    let out = child.0.stdout.take().context("the console is not piped")?;
    let (tx, rx) = mpsc::channel();
    let marker = marker.to_vec();
    std::thread::spawn(move || drain_console(out, &marker, tx));
    let shown = String::from_utf8_lossy(marker_text(&rx, timeout)?.as_slice()).into_owned();
    if shown.is_empty() {
        Ok(())
    } else {
        bail!("the console ended before the guest was ready; it said: {shown:?}")
    }
}

/// `Ok(empty)` when the marker was seen; `Ok(tail)` with the console's last bytes if it ended.
fn marker_text(
    rx: &mpsc::Receiver<Result<(), Vec<u8>>>,
    timeout: Duration,
) -> anyhow::Result<Vec<u8>> {
    match rx.recv_timeout(timeout) {
        Ok(Ok(())) => Ok(Vec::new()),
        Ok(Err(tail)) if tail.is_empty() => Ok(b"(nothing)".to_vec()),
        Ok(Err(tail)) => Ok(tail),
        Err(_) => bail!("the guest did not get ready within {timeout:?}"),
    }
}

/// Reads the console to its end (a guest blocks when nobody reads it); sends `Ok` when `marker`
/// appears, or the console's last bytes if the output ends first.
pub(crate) fn drain_console(
    mut out: ChildStdout,
    marker: &[u8],
    tx: mpsc::Sender<Result<(), Vec<u8>>>,
) {
    let mut window: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut seen = false;
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if seen {
            continue;
        }
        window.extend_from_slice(buf.get(..n).unwrap_or_default());
        if window.windows(marker.len()).any(|w| w == marker) {
            seen = true;
            let _ = tx.send(Ok(()));
        } else if window.len() > 4096 {
            // Keep a tail: enough for the marker and for an error message.
            let keep_from = window.len() - 4096;
            window.drain(..keep_from);
        }
    }
    if !seen {
        let _ = tx.send(Err(window));
    }
}

/// Connects to a Unix socket the child creates once it is up, retrying until `deadline`.
pub fn connect_when_listening(
    sock: &Path,
    child: &mut Reaped,
    deadline: Instant,
) -> anyhow::Result<UnixStream> {
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return Ok(s),
            Err(e) => {
                child
                    .check_alive()
                    .with_context(|| format!("before {} listened", sock.display()))?;
                if Instant::now() > deadline {
                    return Err(e).with_context(|| format!("connecting to {}", sock.display()));
                }
                // Short: the restore time includes this wait.
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

/// The process's resident set, in KiB, once it has settled for a moment.
pub fn settled_rss_kib(pid: u32) -> anyhow::Result<u64> {
    std::thread::sleep(Duration::from_millis(100));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// How much of a peer's log an error message quotes from its end.
const LOG_TAIL_BYTES: u64 = 4096;
const LOG_TAIL_LINES: usize = 3;

/// The last lines of a peer's log file, one line for an error message ("" if there is none).
pub fn log_tail(path: &Path) -> String {
    use std::io::{Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut text = Vec::new();
    if file
        .seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))
        .is_err()
        || file.take(LOG_TAIL_BYTES).read_to_end(&mut text).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("; ")
}

/// Adds the end of the peer's log at `log` to a failed step's error.
pub fn with_log<T>(result: anyhow::Result<T>, log: &Path) -> anyhow::Result<T> {
    result.map_err(|e| match log_tail(log) {
        tail if tail.is_empty() => e,
        tail => e.context(format!("its log ends: {tail}")),
    })
}

/// `path` quoted for `/bin/sh` (QEMU's `exec:` migration URIs go through a shell).
pub fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes_and_spaces() {
        assert_eq!(shell_quote(Path::new("/tmp/a b")), "'/tmp/a b'");
        assert_eq!(shell_quote(Path::new("/tmp/it's")), r"'/tmp/it'\''s'");
    }

    #[test]
    fn a_log_tail_is_its_last_non_empty_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("peer.log");
        assert_eq!(log_tail(&log), "");
        let mut text = "x".repeat(10_000);
        text.push_str(
            "\nfirst\n\n  0: Error booting VM\n  1: could not boot\n  2: Kernel lacks PVH header\n",
        );
        std::fs::write(&log, text).unwrap();
        assert_eq!(
            log_tail(&log),
            "0: Error booting VM; 1: could not boot; 2: Kernel lacks PVH header"
        );
        let err = with_log::<()>(Err(anyhow::anyhow!("no console")), &log).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "its log ends: 0: Error booting VM; 1: could not boot; 2: Kernel lacks PVH header: \
             no console"
        );
    }

    #[test]
    fn console_marker_is_found_across_reads() {
        let mut child = Reaped::spawn(
            Command::new("sh")
                .args([
                    "-c",
                    "printf 'boot'; sleep 0.05; printf 'ed: ready\\n'; sleep 5",
                ])
                .stdout(std::process::Stdio::piped()),
        )
        .unwrap();
        wait_for_console(&mut child, b"booted: ready\n", Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn a_console_that_ends_early_is_an_error_with_its_text() {
        let mut child = Reaped::spawn(
            Command::new("sh")
                .args(["-c", "echo 'qemu: cannot boot'"])
                .stdout(std::process::Stdio::piped()),
        )
        .unwrap();
        let err = wait_for_console(&mut child, b"ready", Duration::from_secs(10)).unwrap_err();
        assert!(format!("{err}").contains("cannot boot"), "{err}");
    }
}
