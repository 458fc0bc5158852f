//! The page cache between samples: each timed snapshot starts with the previous samples'
//! writes on disk, so no sample is throttled by another's writeback.

use std::path::Path;

use anyhow::Context;

/// Waits until the file system holding `path` has written back its dirty data (`syncfs`).
pub(crate) fn flush_file_system(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: syncfs on an fd we own.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncfs on {}", path.display()));
    }
    Ok(())
}
