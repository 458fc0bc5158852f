//! Giving a jailed sandbox process (its own uid) access to the host files the jail bind-mounts
//! in: the sandbox's own files (its work directory, its disk copies) are chowned to it; files
//! that are not its own (a template's snapshot, a shared kernel or read-only disk, a
//! hibernation directory) get a POSIX ACL entry for its uid, removed again when the process
//! has ended. Files that are already readable by everyone are left alone.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const ACL_XATTR: &[u8] = b"system.posix_acl_access\0";
const ACL_VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a path"))
}

fn decode(bytes: &[u8]) -> Option<Vec<Entry>> {
    let (head, rest) = bytes.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*head) != ACL_VERSION || rest.len() % 8 != 0 {
        return None;
    }
    rest.chunks_exact(8)
        .map(|c| {
            Some(Entry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
        })
        .collect()
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = ACL_VERSION.to_le_bytes().to_vec();
    for e in entries {
        out.extend_from_slice(&e.tag.to_le_bytes());
        out.extend_from_slice(&e.perm.to_le_bytes());
        out.extend_from_slice(&e.id.to_le_bytes());
    }
    out
}

/// The file's ACL, or the one its mode bits amount to.
fn read_acl(path: &Path, mode: u32) -> io::Result<Vec<Entry>> {
    let c = c_path(path)?;
    let mut buf = vec![0u8; 4 + 8 * 64];
    // SAFETY: `c` is a NUL-terminated path, the name a NUL-terminated literal, and `buf` is
    // writable for its length.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            ACL_XATTR.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODATA) {
            let bits = |shift: u32| u16::try_from((mode >> shift) & 7).unwrap_or(0);
            return Ok(vec![
                Entry {
                    tag: USER_OBJ,
                    perm: bits(6),
                    id: UNDEFINED_ID,
                },
                Entry {
                    tag: GROUP_OBJ,
                    perm: bits(3),
                    id: UNDEFINED_ID,
                },
                Entry {
                    tag: OTHER,
                    perm: bits(0),
                    id: UNDEFINED_ID,
                },
            ]);
        }
        return Err(e);
    }
    let n = usize::try_from(n).unwrap_or(0);
    decode(&buf[..n.min(buf.len())])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "an ACL this code cannot read"))
}

fn write_acl(path: &Path, entries: &mut Vec<Entry>) -> io::Result<()> {
    entries.sort_by_key(|e| (e.tag, e.id));
    let named = entries.iter().any(|e| e.tag == USER || e.tag == GROUP);
    let class = entries
        .iter()
        .filter(|e| matches!(e.tag, USER | GROUP | GROUP_OBJ))
        .fold(0, |acc, e| acc | e.perm);
    entries.retain(|e| e.tag != MASK);
    if named {
        entries.push(Entry {
            tag: MASK,
            perm: class,
            id: UNDEFINED_ID,
        });
        entries.sort_by_key(|e| (e.tag, e.id));
    }
    let bytes = encode(entries);
    let c = c_path(path)?;
    // SAFETY: `c` and the name are NUL-terminated; `bytes` is readable for its length.
    let rc = unsafe {
        libc::setxattr(
            c.as_ptr(),
            ACL_XATTR.as_ptr().cast(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Holds `flock(LOCK_EX)` on `path` while its ACL is read, changed and written: sandboxes
/// started at once from one template (threads here, or other workers) must not lose each
/// other's entries.
struct AclLock {
    /// The lock lives as long as this descriptor.
    _file: std::fs::File,
}

impl AclLock {
    fn take(path: &Path) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Released when the file is closed.
        Ok(Self { _file: file })
    }
}

/// Adds (or widens) `uid`'s ACL entry on `path` to `perm` (4 = r, 2 = w, 1 = x).
fn add_user(path: &Path, uid: u32, perm: u16) -> io::Result<()> {
    let _lock = AclLock::take(path)?;
    let meta = std::fs::metadata(path)?;
    let mut entries = read_acl(path, meta.mode())?;
    let old = entries
        .iter()
        .find(|e| e.tag == USER && e.id == uid)
        .map_or(0, |e| e.perm);
    entries.retain(|e| !(e.tag == USER && e.id == uid));
    entries.push(Entry {
        tag: USER,
        perm: old | perm,
        id: uid,
    });
    write_acl(path, &mut entries)
}

/// Removes `uid`'s ACL entry from `path` (nothing when it has none).
fn remove_user(path: &Path, uid: u32) -> io::Result<()> {
    let _lock = AclLock::take(path)?;
    let meta = std::fs::metadata(path)?;
    let mut entries = read_acl(path, meta.mode())?;
    let before = entries.len();
    entries.retain(|e| !(e.tag == USER && e.id == uid));
    if entries.len() == before {
        return Ok(());
    }
    write_acl(path, &mut entries)
}

/// What a process was granted, to take back when it has ended.
#[derive(Debug, Default)]
pub(crate) struct Grants {
    uid: u32,
    acl: Vec<PathBuf>,
}

impl Grants {
    pub fn new(uid: u32) -> Self {
        Self {
            uid,
            acl: Vec::new(),
        }
    }

    /// Lets the uid read (`write`: and write) the file `path`, or read and enter the directory.
    pub fn allow(&mut self, path: &Path, write: bool) -> io::Result<()> {
        let meta = std::fs::metadata(path)?;
        if meta.uid() == self.uid {
            return Ok(());
        }
        let needed: u16 = if meta.is_dir() {
            5
        } else if write {
            6
        } else {
            4
        };
        let other = u16::try_from(meta.mode() & 7).unwrap_or(0);
        if other & needed == needed {
            return Ok(());
        }
        add_user(path, self.uid, needed)?;
        self.acl.push(path.to_path_buf());
        Ok(())
    }

    /// A snapshot directory and its files, read-only.
    pub fn allow_snapshot_dir(&mut self, dir: &Path) -> io::Result<()> {
        self.allow(dir, false)?;
        for name in snapshot::SNAPSHOT_FILES {
            let file = dir.join(name);
            if file.exists() {
                self.allow(&file, false)?;
            }
        }
        Ok(())
    }

    /// Takes every ACL entry back (best effort: a file may be gone).
    pub fn revoke(&mut self) {
        for path in self.acl.drain(..) {
            if let Err(e) = remove_user(&path, self.uid) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(
                        "removing uid {}'s access to {}: {e}",
                        self.uid,
                        path.display()
                    );
                }
            }
        }
    }
}

impl Drop for Grants {
    fn drop(&mut self) {
        self.revoke();
    }
}

/// Makes the sandbox's own file or directory the jailed uid's.
pub(crate) fn give(path: &Path, uid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn acl_round_trip_and_mask() {
        let entries = vec![
            Entry {
                tag: USER_OBJ,
                perm: 6,
                id: UNDEFINED_ID,
            },
            Entry {
                tag: USER,
                perm: 4,
                id: 1234,
            },
            Entry {
                tag: GROUP_OBJ,
                perm: 0,
                id: UNDEFINED_ID,
            },
            Entry {
                tag: MASK,
                perm: 4,
                id: UNDEFINED_ID,
            },
            Entry {
                tag: OTHER,
                perm: 0,
                id: UNDEFINED_ID,
            },
        ];
        assert_eq!(decode(&encode(&entries)).unwrap(), entries);
        assert!(decode(&[1, 0, 0, 0]).is_none());
    }

    #[test]
    fn grant_and_revoke_on_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state.bin");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut grants = Grants::new(3_999_999);
        match grants.allow(&file, false) {
            Ok(()) => {}
            // A file system without ACLs: nothing to check here.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return,
            Err(e) => panic!("{e}"),
        }
        let meta = std::fs::metadata(&file).unwrap();
        let acl = read_acl(&file, meta.mode()).unwrap();
        assert!(
            acl.contains(&Entry {
                tag: USER,
                perm: 4,
                id: 3_999_999
            }),
            "{acl:?}"
        );
        assert!(
            acl.iter().any(|e| e.tag == MASK && e.perm & 4 == 4),
            "{acl:?}"
        );
        // The owner's bits are unchanged.
        assert_eq!(meta.mode() & 0o700, 0o600);
        grants.revoke();
        let acl = read_acl(&file, std::fs::metadata(&file).unwrap().mode()).unwrap();
        assert!(!acl.iter().any(|e| e.tag == USER), "{acl:?}");
        // Many grants at once on one file (sandboxes started together from one template):
        // none is lost.
        let threads: Vec<_> = (0..8u32)
            .map(|i| {
                let file = file.clone();
                std::thread::spawn(move || {
                    let mut g = Grants::new(3_900_000 + i);
                    g.allow(&file, false).unwrap();
                    std::mem::forget(g);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let acl = read_acl(&file, std::fs::metadata(&file).unwrap().mode()).unwrap();
        assert_eq!(acl.iter().filter(|e| e.tag == USER).count(), 8, "{acl:?}");
        // Already readable by everyone: no entry added.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        grants.allow(&file, false).unwrap();
        assert!(grants.acl.is_empty());
    }
}
