//! Transfer progress, reported to whatever the caller shows (the CLI: a bar on a terminal).

/// Called from transfer tasks; implementations must be cheap and thread-safe.
pub trait Progress: Send + Sync {
    /// The transfer will cover `total` bytes (uncompressed).
    fn start(&self, _total: u64) {}
    /// `bytes` more are done.
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// Shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
