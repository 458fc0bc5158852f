//! Firecracker's metrics file (`--metrics-path`, `PUT /metrics`): a file or named pipe opened
//! once, non-blocking (a full pipe drops a line instead of stalling the writer), to which each
//! flush appends one JSON line of the VM's counters (`vmm_metrics::json`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use vmm_metrics::json::{utc_now_ms, Flusher};
use vmm_metrics::VmMetrics;

use super::error::FcError;

/// Firecracker's messages, so clients matching on them keep working.
pub const ALREADY_INITIALIZED: &str = "Reinitialization of metrics not allowed.";
pub const NOT_INITIALIZED: &str =
    "The metrics system is not initialized: configure it with PUT /metrics or --metrics-path.";

struct Open {
    file: File,
    flusher: Flusher,
}

/// The metrics destination of one VMM; at most one, set once.
#[derive(Default)]
pub struct MetricsFile {
    open: Mutex<Option<Open>>,
}

impl MetricsFile {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Open>> {
        // A flush never leaves the state half-changed: a poisoned lock is still usable.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens `path` as Firecracker does (created if missing; read and write, so a named pipe
    /// opens without a reader; non-blocking) and appends from then on.
    pub fn open(&self, path: &Path) -> Result<(), FcError> {
        let mut open = self.lock();
        if open.is_some() {
            return Err(FcError::bad(ALREADY_INITIALIZED));
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| {
                FcError::bad(format!(
                    "Cannot open the metrics file {}: {e}",
                    path.display()
                ))
            })?;
        *open = Some(Open {
            file,
            flusher: Flusher::new(),
        });
        Ok(())
    }

    pub fn is_open(&self) -> bool {
        self.lock().is_some()
    }

    /// Appends one line: every counter's change since the previous line.
    pub fn flush(&self, metrics: &VmMetrics) -> Result<(), FcError> {
        let mut guard = self.lock();
        let Some(open) = guard.as_mut() else {
            return Err(FcError::bad(NOT_INITIALIZED));
        };
        let mut line = open.flusher.line(metrics, utc_now_ms());
        line.push('\n');
        // One write: on a pipe, a line is either whole or (full pipe) not there at all.
        match open.file.write(line.as_bytes()) {
            Ok(n) if n == line.len() => Ok(()),
            Ok(n) => Err(FcError::bad(format!(
                "Failed to write metrics: wrote {n} of {} bytes",
                line.len()
            ))),
            Err(e) => Err(FcError::bad(format!("Failed to write metrics: {e}"))),
        }
    }
}
