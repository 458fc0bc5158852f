//! Small file-system helpers: atomic replace, bounded reads, hole-aware extent listing and
//! in-kernel range copies. Nothing here knows about snapshot formats.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{io_err, Result, SnapshotError};

/// `count` random bytes from the kernel, hex encoded. Used for snapshot ids and temp names.
pub(crate) fn random_hex(count: usize) -> Result<String> {
    let mut bytes = vec![0u8; count];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into the buffer we own.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io_err("getrandom", "/dev/urandom")(err));
        }
        filled += got as usize;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A sibling path of `path` for a temporary file: same directory, so a rename is atomic.
pub(crate) fn temp_sibling(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        SnapshotError::InvalidRequest(format!("{} has no file name", path.display()))
    })?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".tmp-{}-{}", std::process::id(), random_hex(6)?));
    Ok(path.with_file_name(temp_name))
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    let handle = File::open(dir).map_err(io_err("open directory", dir))?;
    handle.sync_all().map_err(io_err("fsync directory", dir))
}

/// Mode of every file in a snapshot: guest memory holds tenants' secrets.
pub(crate) const FILE_MODE: u32 = 0o600;
/// Mode of snapshot and staging directories.
pub(crate) const DIR_MODE: u32 = 0o700;

/// Creates the new file `path` (which must not exist) with mode 0600 whatever the umask: the
/// open asks for 0600 so it is never wider, then `fchmod` makes it exactly that.
pub(crate) fn create_private(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(io_err("create", path))?;
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
        .map_err(io_err("set mode 0600 on", path))?;
    Ok(file)
}

/// Replaces `path` with `bytes` atomically: readers see either the old or the new content, never
/// a mix. With `sync`, the data and the rename are durable when this returns.
pub(crate) fn write_file_atomic(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    let temp = temp_sibling(path)?;
    let outcome = (|| {
        let mut file = create_private(&temp)?;
        file.write_all(bytes).map_err(io_err("write", &temp))?;
        if sync {
            file.sync_all().map_err(io_err("fsync", &temp))?;
        }
        fs::rename(&temp, path).map_err(io_err("rename into place", path))
    })();
    if outcome.is_err() {
        let _ = fs::remove_file(&temp);
    }
    outcome?;
    if sync {
        fsync_dir(parent_dir(path))?;
    }
    Ok(())
}

/// Reads a whole file, refusing (before allocating) anything larger than `max` bytes.
pub(crate) fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    if len > max {
        return Err(SnapshotError::TooLarge {
            path: path.to_path_buf(),
            len,
            max,
        });
    }
    // The file may grow between stat and read; `take` keeps the bound regardless.
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    if bytes.len() as u64 > max {
        return Err(SnapshotError::TooLarge {
            path: path.to_path_buf(),
            len: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}

/// Byte ranges `[start, end)` within `[from, to)` that hold data (not holes), using
/// `SEEK_DATA`/`SEEK_HOLE`. File systems without hole support report one data extent.
pub(crate) fn data_extents(
    file: &File,
    path: &Path,
    from: u64,
    to: u64,
) -> Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut pos = from;
    while pos < to {
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(offset) => offset,
            // ENXIO: no data at or after `pos`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(io_err("lseek(SEEK_DATA)", path)(e)),
        };
        if data >= to {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE).map_err(io_err("lseek(SEEK_HOLE)", path))?;
        let end = hole.min(to);
        if end <= data {
            break;
        }
        extents.push((data, end));
        pos = end;
    }
    Ok(extents)
}

fn seek(file: &File, offset: u64, whence: i32) -> io::Result<u64> {
    let offset = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a descriptor we own; it does not touch memory.
    let result = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result as u64)
    }
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off`, in the kernel when it can
/// (`copy_file_range`), falling back to a buffered copy.
pub(crate) fn copy_range(
    src: &File,
    src_path: &Path,
    mut src_off: u64,
    dst: &File,
    dst_path: &Path,
    mut dst_off: u64,
    mut len: u64,
) -> Result<()> {
    while len > 0 {
        let chunk = len.min(1 << 30) as usize;
        let mut in_off = src_off as libc::loff_t;
        let mut out_off = dst_off as libc::loff_t;
        // SAFETY: both descriptors are open files we own; the offsets are plain integers the
        // kernel updates in place.
        let copied = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut in_off,
                dst.as_raw_fd(),
                &mut out_off,
                chunk,
                0,
            )
        };
        if copied < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP) => {
                    return copy_range_buffered(
                        src, src_path, src_off, dst, dst_path, dst_off, len,
                    );
                }
                _ => return Err(io_err("copy_file_range", dst_path)(err)),
            }
        }
        if copied == 0 {
            return Err(SnapshotError::Truncated {
                path: src_path.to_path_buf(),
                expected: src_off.saturating_add(len),
                actual: src_off,
            });
        }
        let copied = copied as u64;
        src_off += copied;
        dst_off += copied;
        len -= copied;
    }
    Ok(())
}

fn copy_range_buffered(
    src: &File,
    src_path: &Path,
    mut src_off: u64,
    dst: &File,
    dst_path: &Path,
    mut dst_off: u64,
    mut len: u64,
) -> Result<()> {
    let mut buffer = vec![0u8; 1 << 20];
    while len > 0 {
        let chunk = len.min(buffer.len() as u64) as usize;
        let part = &mut buffer[..chunk];
        src.read_exact_at(part, src_off)
            .map_err(io_err("read", src_path))?;
        dst.write_all_at(part, dst_off)
            .map_err(io_err("write", dst_path))?;
        src_off += chunk as u64;
        dst_off += chunk as u64;
        len -= chunk as u64;
    }
    Ok(())
}

pub(crate) fn exchange(a: &Path, b: &Path) -> Result<()> {
    let c_a = CString::new(a.as_os_str().as_bytes()).map_err(|_| {
        SnapshotError::InvalidRequest(format!("{} contains a NUL byte", a.display()))
    })?;
    let c_b = CString::new(b.as_os_str().as_bytes()).map_err(|_| {
        SnapshotError::InvalidRequest(format!("{} contains a NUL byte", b.display()))
    })?;
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    let result = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_a.as_ptr(),
            libc::AT_FDCWD,
            c_b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if result != 0 {
        return Err(io_err("exchange snapshot directories", b)(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}
