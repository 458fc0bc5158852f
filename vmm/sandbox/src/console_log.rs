//! A sandbox's guest console kept in a bounded file: `console.log` grows to `limit` bytes, then
//! becomes `console.log.1` (replacing the previous one) and a new `console.log` starts, so a
//! chatty or hostile guest costs at most twice `limit` of disk. The last lines explain a guest
//! panic or a failed boot (`tail_lines`).
//!
//! The console always reaches the file through a pipe that a small task copies (`spawn_pump`):
//! in Process mode that pipe is the process's stdout; in-process the VM's vCPU threads write
//! it, and under their seccomp filter they may `write(2)` but never rename or open files.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use tokio::sync::watch;

use crate::log_text::{read_tail, strip_ansi};

/// Default size of `console.log` before it rotates: 1 MiB.
pub const DEFAULT_CONSOLE_LOG_BYTES: u64 = 1024 * 1024;

/// The console log file name in a sandbox's work directory.
pub const CONSOLE_LOG_FILE: &str = "console.log";

/// Where a sandbox's console goes and how much of it is kept.
#[derive(Debug, Clone)]
pub(crate) struct ConsoleLog {
    pub path: PathBuf,
    /// Bytes per file before rotating (at least 1).
    pub limit: u64,
    /// Turns true once the latest pump into this log has copied everything (shared by the
    /// clones: the sandbox's record asks, the start that made the pump sets it).
    drained: std::sync::Arc<std::sync::Mutex<Option<watch::Receiver<bool>>>>,
}

impl ConsoleLog {
    pub fn new(path: PathBuf, limit: u64) -> Self {
        Self {
            path,
            limit: limit.max(1),
            drained: Default::default(),
        }
    }

    /// Waits (at most `timeout`) until the console's last bytes are in the file: after the VM
    /// or process has ended, before reading its last lines.
    pub async fn drained(&self, timeout: std::time::Duration) {
        let receiver = self
            .drained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(mut receiver) = receiver {
            let _ = tokio::time::timeout(timeout, receiver.wait_for(|done| *done)).await;
        }
    }

    /// Copies what arrives on `reader` (a pipe's read end) into the log until every writer
    /// has closed it. One small task per sandbox, no thread. Needs a tokio runtime context.
    pub fn spawn_pump(&self, reader: OwnedFd) -> io::Result<()> {
        self.spawn_pump_into(reader, self.open()?)
    }

    fn spawn_pump_into(&self, reader: OwnedFd, log: BoundedLog) -> io::Result<()> {
        let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(reader)?;
        let (drained, receiver) = watch::channel(false);
        *self.drained.lock().unwrap_or_else(|e| e.into_inner()) = Some(receiver);
        tokio::spawn(pump(pipe, log, drained));
        Ok(())
    }

    /// The rotated file: `<path>.1`.
    pub fn previous(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".1");
        PathBuf::from(name)
    }

    pub fn open(&self) -> io::Result<BoundedLog> {
        BoundedLog::open(self.clone())
    }

    /// A pipe copied into this log: the write end, for an in-process VM's console (blocking:
    /// a full pipe waits for the copier rather than losing the guest's last words). Needs a
    /// tokio runtime context.
    pub fn piped(&self) -> io::Result<File> {
        // Fail before making the pipe when the file cannot be opened.
        let log = self.open()?;
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and owned by nothing else.
        let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        self.spawn_pump_into(reader, log)?;
        Ok(writer)
    }

    /// The last `count` non-empty lines of the console (from the rotated file too when the
    /// current one is short), lossy UTF-8, without terminal escapes or carriage returns.
    pub fn tail_lines(&self, count: usize) -> Vec<String> {
        const TAIL_BYTES: u64 = 16 * 1024;
        let mut bytes = read_tail(&self.previous(), TAIL_BYTES);
        bytes.extend(read_tail(&self.path, TAIL_BYTES));
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<String> = text
            .lines()
            .map(|line| printable(line).trim_end().to_owned())
            .filter(|line| !line.trim().is_empty())
            .collect();
        let skip = lines.len().saturating_sub(count);
        lines.into_iter().skip(skip).collect()
    }
}

/// Without terminal escapes, and without control characters but tabs (carriage returns).
fn printable(line: &str) -> String {
    strip_ansi(line)
        .chars()
        .filter(|c| !c.is_control() || *c == '\t')
        .collect()
}

async fn pump(
    mut pipe: tokio::net::unix::pipe::Receiver,
    mut log: BoundedLog,
    drained: watch::Sender<bool>,
) {
    use tokio::io::AsyncReadExt;
    let mut buffer = vec![0u8; 16 * 1024];
    let mut failed = false;
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // A short append to a local file (page cache), so inline. On failure keep
                // reading: a full pipe would stall the guest's console.
                let written = log.write_all(buffer.get(..n).unwrap_or_default());
                if let (Err(e), false) = (written, failed) {
                    tracing::warn!("console log {}: {e}", log.log.path.display());
                    failed = true;
                }
            }
        }
    }
    let _ = drained.send(true);
}

/// The writer: appends to `console.log`, rotating at the limit.
pub(crate) struct BoundedLog {
    log: ConsoleLog,
    file: File,
    written: u64,
}

impl BoundedLog {
    /// Appends to an existing log (a woken sandbox continues its console).
    fn open(log: ConsoleLog) -> io::Result<Self> {
        if let Some(parent) = log.path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log.path)?;
        let written = file.metadata()?.len();
        Ok(Self { log, file, written })
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.log.path, self.log.previous())?;
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.log.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for BoundedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.written >= self.log.limit {
            self.rotate()?;
        }
        let room = usize::try_from(self.log.limit - self.written).unwrap_or(usize::MAX);
        let take = buf.len().min(room);
        let written = self.file.write(buf.get(..take).unwrap_or_default())?;
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_never_keeps_more_than_twice_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::new(dir.path().join("sb-1").join(CONSOLE_LOG_FILE), 100);
        let mut writer = log.open().unwrap();
        for i in 0..1000 {
            writeln!(writer, "line {i}").unwrap();
        }
        // One write far above the limit is cut into pieces, never one big file.
        writer.write_all(&[b'x'; 10_000]).unwrap();
        writer.write_all(b"\nlast words\n").unwrap();
        let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
        assert!(size(&log.path) <= 100, "{}", size(&log.path));
        assert!(size(&log.previous()) <= 100);
        assert_eq!(log.tail_lines(1), ["last words"]);

        // Reopening appends (a woken sandbox) and keeps the bound.
        drop(writer);
        let mut again = log.open().unwrap();
        again.write_all(b"woken\n").unwrap();
        assert!(size(&log.path) <= 100);
        assert_eq!(log.tail_lines(2), ["last words", "woken"]);
    }

    #[tokio::test]
    async fn the_pipe_reaches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::new(dir.path().join(CONSOLE_LOG_FILE), 1024);
        let mut writer = log.piped().unwrap();
        writer.write_all(b"[    0.000000] Linux version\n").unwrap();
        drop(writer);
        log.clone().drained(std::time::Duration::from_secs(5)).await;
        assert_eq!(log.tail_lines(1), ["[    0.000000] Linux version"]);
    }

    #[test]
    fn tail_spans_the_rotation_and_strips_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::new(dir.path().join(CONSOLE_LOG_FILE), 1024);
        std::fs::write(log.previous(), "old 1\nold 2\n").unwrap();
        std::fs::write(
            &log.path,
            "\u{1b}[31mKernel panic - not syncing\u{1b}[0m\r\n\n",
        )
        .unwrap();
        assert_eq!(
            log.tail_lines(3),
            ["old 1", "old 2", "Kernel panic - not syncing"]
        );
        let missing = ConsoleLog::new(dir.path().join("none"), 1);
        assert!(missing.tail_lines(5).is_empty());
    }
}
