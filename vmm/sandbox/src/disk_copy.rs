//! A sandbox's own copy of a disk image: a reflink (`ioctl(FICLONE)`: shared extents,
//! copy-on-write, O(1)) when the filesystem supports it (btrfs, XFS, bcachefs, …), else a sparse
//! copy that only copies the image's data extents (`SEEK_DATA`/`SEEK_HOLE` + `copy_file_range`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    Reflink,
    SparseCopy,
}

/// Copies `from` to the new file `to` (which must not exist), preserving holes.
pub fn clone_or_copy(from: &Path, to: &Path) -> io::Result<CopyMethod> {
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    // Owner-only: a copy holds the guest's disk (a checkpoint's copies sit beside its memory).
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    let result = match reflink(&src, &dst) {
        Ok(()) => Ok(CopyMethod::Reflink),
        Err(e) if reflink_unsupported(&e) => {
            sparse_copy(&src, &dst, len).map(|()| CopyMethod::SparseCopy)
        }
        Err(e) => Err(e),
    };
    if result.is_err() {
        // Never leave a half-written copy behind under the final name.
        let _ = std::fs::remove_file(to);
    }
    result
}

fn reflink(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open for the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Errors meaning "this filesystem (pair) cannot share extents", not "something is broken".
fn reflink_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL | libc::ENOSYS)
    )
}

fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    dst.set_len(len)?;
    let mut offset = 0u64;
    while offset < len {
        let Some(data) = seek(src, offset, libc::SEEK_DATA)? else {
            break; // only a hole remains
        };
        let end = seek(src, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        copy_range(src, dst, data, end)?;
        offset = end;
    }
    Ok(())
}

/// `lseek` to the next data or hole; `None` past the last data (ENXIO). A filesystem without
/// SEEK_DATA support reports the whole file as data.
fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(from)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek on an open fd; it does not touch memory.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if rc >= 0 {
        return Ok(u64::try_from(rc).ok());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        Some(libc::EINVAL) if whence == libc::SEEK_DATA => Ok(Some(from)),
        Some(libc::EINVAL) => Ok(None),
        _ => Err(e),
    }
}

fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut pos = start;
    while pos < end {
        let (mut off_in, mut off_out) = (pos as libc::loff_t, pos as libc::loff_t);
        let want = usize::try_from(end - pos)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        // SAFETY: both fds are open; the offsets are ours and the kernel updates them.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        match n {
            0 => return Ok(()), // the source shrank under us
            n if n > 0 => pos += n as u64,
            _ => {
                let e = io::Error::last_os_error();
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                ) {
                    return copy_range_by_read(src, dst, pos, end);
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The portable fallback; all-zero blocks are skipped so they stay holes.
fn copy_range_by_read(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = start;
    while pos < end {
        let want = usize::try_from(end - pos)
            .unwrap_or(buf.len())
            .min(buf.len());
        let chunk = buf.get_mut(..want).unwrap_or_default();
        let n = src.read_at(chunk, pos)?;
        if n == 0 {
            return Ok(());
        }
        let data = chunk.get(..n).unwrap_or_default();
        if data.iter().any(|&b| b != 0) {
            dst.write_all_at(data, pos)?;
        }
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copies_content_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src.img");
        let src = File::create(&src_path).unwrap();
        let len = 64 << 20;
        src.set_len(len).unwrap();
        src.write_all_at(b"head", 0).unwrap();
        src.write_all_at(&[0xab; 8192], 32 << 20).unwrap();
        src.write_all_at(b"tail", len - 4).unwrap();
        drop(src);

        let dst_path = dir.path().join("dst.img");
        let method = clone_or_copy(&src_path, &dst_path).unwrap();
        assert!(matches!(
            method,
            CopyMethod::Reflink | CopyMethod::SparseCopy
        ));
        let (a, b) = (
            std::fs::read(&src_path).unwrap(),
            std::fs::read(&dst_path).unwrap(),
        );
        assert_eq!(a.len(), b.len());
        assert!(a == b, "copy differs from its source");
        // A 64 MiB image with ~12 KiB of data must not become 64 MiB of allocated blocks.
        let allocated = std::fs::metadata(&dst_path).unwrap().blocks() * 512;
        assert!(allocated < 4 << 20, "copy allocates {allocated} bytes");

        // The copy is independent: writing it leaves the source alone.
        let dst = OpenOptions::new().write(true).open(&dst_path).unwrap();
        dst.write_all_at(b"HEAD", 0).unwrap();
        assert_eq!(&std::fs::read(&src_path).unwrap()[..4], b"head");
    }

    #[test]
    fn refuses_to_overwrite_and_reports_missing_source() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        std::fs::write(&src, b"x").unwrap();
        let dst = dir.path().join("dst.img");
        std::fs::write(&dst, b"keep").unwrap();
        assert_eq!(
            clone_or_copy(&src, &dst).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&dst).unwrap(), b"keep");
        let missing = dir.path().join("missing.img");
        assert_eq!(
            clone_or_copy(&missing, &dir.path().join("new.img"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn empty_and_fully_sparse_images() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.img");
        File::create(&empty).unwrap();
        clone_or_copy(&empty, &dir.path().join("empty2.img")).unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("empty2.img"))
                .unwrap()
                .len(),
            0
        );
        let holes = dir.path().join("holes.img");
        File::create(&holes).unwrap().set_len(1 << 20).unwrap();
        clone_or_copy(&holes, &dir.path().join("holes2.img")).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("holes2.img")).unwrap(),
            vec![0u8; 1 << 20]
        );
    }
}
