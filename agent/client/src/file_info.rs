//! What `stat` and `list_dir` return: a plain Rust view of the protocol's `FileInfo` (whose
//! type is a raw `i32` and which carries only the final name).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::proto;

/// What kind of file an entry is (symlinks are not followed by `list_dir`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    /// Devices, sockets, FIFOs, and any type this client does not know.
    Other,
}

/// Metadata of one guest file, as the agent reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// The full guest path: the path given to `stat`, or the listed directory joined with
    /// [`Self::name`].
    pub path: String,
    /// The final path component (lossy UTF-8).
    pub name: String,
    pub kind: FileKind,
    /// Bytes (of the link itself for a symlink in a listing).
    pub size: u64,
    /// Permission bits, e.g. `0o644` (no file-type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Last modification (the Unix epoch when the agent could not tell).
    pub modified: SystemTime,
    /// A symlink's target.
    pub symlink_target: Option<String>,
}

impl FileInfo {
    pub fn is_dir(&self) -> bool {
        self.kind == FileKind::Dir
    }

    pub fn is_file(&self) -> bool {
        self.kind == FileKind::File
    }

    pub fn is_symlink(&self) -> bool {
        self.kind == FileKind::Symlink
    }

    /// `info` as returned for `path` (stat).
    pub(crate) fn at(path: &str, info: proto::FileInfo) -> Self {
        Self::convert(path.to_owned(), info)
    }

    /// `info` as an entry of the directory `dir` (list_dir).
    pub(crate) fn in_dir(dir: &str, info: proto::FileInfo) -> Self {
        let path = format!("{}/{}", dir.trim_end_matches('/'), info.name);
        Self::convert(path, info)
    }

    fn convert(path: String, info: proto::FileInfo) -> Self {
        let kind = match proto::FileType::try_from(info.r#type) {
            Ok(proto::FileType::File) => FileKind::File,
            Ok(proto::FileType::Directory) => FileKind::Dir,
            Ok(proto::FileType::Symlink) => FileKind::Symlink,
            _ => FileKind::Other,
        };
        let nanos = info.mtime_unix_nanos;
        let since_epoch = Duration::from_nanos(nanos.unsigned_abs());
        // A hostile or odd value must not overflow: fall back to the epoch.
        let modified = if nanos >= 0 {
            UNIX_EPOCH.checked_add(since_epoch)
        } else {
            UNIX_EPOCH.checked_sub(since_epoch)
        }
        .unwrap_or(UNIX_EPOCH);
        Self {
            path,
            name: info.name,
            kind,
            size: info.size,
            mode: info.mode,
            uid: info.uid,
            gid: info.gid,
            modified,
            symlink_target: (!info.symlink_target.is_empty()).then_some(info.symlink_target),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_kind_time_and_path() {
        let raw = proto::FileInfo {
            name: "b".into(),
            r#type: proto::FileType::Directory.into(),
            size: 4096,
            mode: 0o755,
            mtime_unix_nanos: 1_500_000_000,
            ..proto::FileInfo::default()
        };
        let info = FileInfo::in_dir("/work/a/", raw.clone());
        assert_eq!(info.path, "/work/a/b");
        assert!(info.is_dir() && !info.is_file());
        assert_eq!(info.kind, FileKind::Dir);
        assert_eq!(info.modified, UNIX_EPOCH + Duration::from_millis(1500));
        assert_eq!(info.symlink_target, None);
        assert_eq!(FileInfo::in_dir("/", raw.clone()).path, "/b");
        assert_eq!(FileInfo::at("/work/a/b", raw).path, "/work/a/b");

        let odd = proto::FileInfo {
            r#type: 99,
            mtime_unix_nanos: i64::MIN,
            symlink_target: "x".into(),
            ..proto::FileInfo::default()
        };
        let info = FileInfo::at("/x", odd);
        assert_eq!(info.kind, FileKind::Other);
        assert!(info.modified <= UNIX_EPOCH);
        assert_eq!(info.symlink_target.as_deref(), Some("x"));
    }
}
