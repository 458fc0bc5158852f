//! The sandbox's part of a checkpoint directory: next to the VM snapshot, a copy of each
//! writable disk taken while the VM was paused (so memory and disks are from the same instant)
//! and `sandbox.json` saying which copy belongs to which saved disk.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::disk_copy::clone_or_copy;
use super::error::{Result, SandboxError};
use vmm::device_manager::VirtioKind;
use vmm::vm::VmSnapshotState;

pub const SANDBOX_FILE: &str = "sandbox.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointDisks {
    pub version: u32,
    /// In the snapshot's disk order.
    pub disks: Vec<CheckpointDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointDisk {
    /// The disk the VM had when it was checkpointed.
    pub original: PathBuf,
    pub read_only: bool,
    /// The copy inside the checkpoint directory (file name), for writable disks.
    pub copy: Option<String>,
}

impl CheckpointDisks {
    pub fn new(disks: Vec<CheckpointDisk>) -> Self {
        Self {
            version: FORMAT_VERSION,
            disks,
        }
    }
}

/// Name of the copy of writable disk `index`.
pub fn copy_name(index: usize) -> String {
    format!("disk-{index}.img")
}

/// Whether `name` is a file a checkpoint puts next to its snapshot: `sandbox.json` or a disk
/// copy (`disk-N.img`). Replacing a checkpoint replaces these with its snapshot files.
pub fn is_checkpoint_file(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    name == SANDBOX_FILE
        || name
            .strip_prefix("disk-")
            .and_then(|rest| rest.strip_suffix(".img"))
            .is_some_and(|index| !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
}

pub fn write(dir: &Path, disks: &CheckpointDisks) -> Result<()> {
    let path = dir.join(SANDBOX_FILE);
    let json = serde_json::to_vec_pretty(disks)
        .map_err(|e| SandboxError::io("encoding", &path, std::io::Error::other(e)))?;
    // Private like the snapshot files beside it.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| SandboxError::io("creating", &path, e))?;
    file.write_all(&json)
        .map_err(|e| SandboxError::io("writing", &path, e))
}

/// What a snapshot step needs to know about a sandbox's disks.
pub struct DiskPlan {
    /// Writable disk files, flushed before the snapshot.
    pub writable: Vec<PathBuf>,
    /// Every disk in the VM's order (path, read-only), for a checkpoint's disk copies.
    pub all: Vec<(PathBuf, bool)>,
}

impl DiskPlan {
    /// From each disk's (path, read-only), in the VM's order.
    pub fn of(disks: impl IntoIterator<Item = (PathBuf, bool)>) -> Self {
        let all: Vec<(PathBuf, bool)> = disks.into_iter().collect();
        let writable = all
            .iter()
            .filter(|(_, ro)| !ro)
            .map(|(p, _)| p.clone())
            .collect();
        Self { writable, all }
    }

    /// fsync every writable disk file (the device writes through the page cache; fsync on any
    /// fd of the file flushes it). Call while the VM is paused.
    pub fn flush(&self) -> Result<()> {
        for path in &self.writable {
            std::fs::File::open(path)
                .and_then(|f| f.sync_all())
                .map_err(|e| SandboxError::io("flushing disk", path, e))?;
        }
        Ok(())
    }

    /// Copies each writable disk into `dir` and writes `sandbox.json` naming the copies. Call
    /// while the VM is paused, right after its snapshot into `dir`.
    pub fn copy_into(&self, dir: &Path) -> Result<()> {
        let mut listed = Vec::with_capacity(self.all.len());
        for (index, (original, read_only)) in self.all.iter().enumerate() {
            let copy = if *read_only {
                None
            } else {
                let name = copy_name(index);
                let to = dir.join(&name);
                clone_or_copy(original, &to).map_err(|source| SandboxError::DiskCopy {
                    from: original.clone(),
                    to,
                    source,
                })?;
                Some(name)
            };
            listed.push(CheckpointDisk {
                original: original.clone(),
                read_only: *read_only,
                copy,
            });
        }
        write(dir, &CheckpointDisks::new(listed))
    }
}

/// What a fork needs to know about a checkpoint (or any snapshot directory).
#[derive(Debug, Clone)]
pub struct TemplateLayout {
    pub vcpus: u8,
    pub mem_mib: u64,
    /// Per saved disk, in order: where the fork copies it from (or shares it, if read-only).
    pub disks: Vec<TemplateDisk>,
    pub nets: usize,
    pub has_vsock: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateDisk {
    pub source: PathBuf,
    pub read_only: bool,
}

/// Reads the snapshot's state and `sandbox.json` (optional: a snapshot taken by other means
/// forks from its disks' current contents).
pub fn read_layout(dir: &Path) -> Result<TemplateLayout> {
    let state: VmSnapshotState = snapshot::read_state(dir).map_err(|e| bad_state(dir, e))?;
    layout_of(dir, &state)
}

/// A checkpoint whose snapshot state cannot be read.
pub fn bad_state(dir: &Path, e: snapshot::SnapshotError) -> SandboxError {
    SandboxError::BadCheckpoint {
        dir: dir.to_path_buf(),
        message: format!("reading its state: {e}"),
    }
}

/// The layout of the checkpoint in `dir` whose snapshot state is `state` (`sandbox.json` is
/// read here).
pub fn layout_of(dir: &Path, state: &VmSnapshotState) -> Result<TemplateLayout> {
    let bad = |message: String| SandboxError::BadCheckpoint {
        dir: dir.to_path_buf(),
        message,
    };
    let sidecar: Option<CheckpointDisks> = match std::fs::read(dir.join(SANDBOX_FILE)) {
        Ok(bytes) => {
            Some(serde_json::from_slice(&bytes).map_err(|e| bad(format!("{SANDBOX_FILE}: {e}")))?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(SandboxError::io("reading", dir.join(SANDBOX_FILE), e)),
    };
    if let Some(s) = &sidecar {
        if s.version != FORMAT_VERSION {
            return Err(bad(format!(
                "{SANDBOX_FILE} has version {}, this build reads {FORMAT_VERSION}",
                s.version
            )));
        }
    }
    let mut disks = Vec::new();
    let (mut nets, mut has_vsock) = (0, false);
    for saved in &state.devices.virtio {
        match saved.kind() {
            VirtioKind::Block {
                path, read_only, ..
            } => {
                let index = disks.len();
                let copy = sidecar
                    .as_ref()
                    .and_then(|s| s.disks.get(index))
                    .and_then(|d| d.copy.as_deref());
                let source = match copy {
                    Some(name) if is_plain_file_name(name) => dir.join(name),
                    Some(name) => return Err(bad(format!("disk copy name {name:?}"))),
                    None => path,
                };
                disks.push(TemplateDisk { source, read_only });
            }
            VirtioKind::Net { .. } => nets += 1,
            VirtioKind::Vsock { .. } => has_vsock = true,
            VirtioKind::Balloon { .. } => {}
        }
    }
    if let Some(s) = &sidecar {
        if s.disks.len() != disks.len() {
            return Err(bad(format!(
                "{SANDBOX_FILE} lists {} disks, the snapshot has {}",
                s.disks.len(),
                disks.len()
            )));
        }
    }
    Ok(TemplateLayout {
        vcpus: state.vcpu_count,
        mem_mib: state.mem_mib,
        disks,
        nets,
        has_vsock,
    })
}

/// A name inside the checkpoint directory, never a path out of it.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_round_trip_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let disks = CheckpointDisks {
            version: FORMAT_VERSION,
            disks: vec![
                CheckpointDisk {
                    original: "/a/rootfs.img".into(),
                    read_only: false,
                    copy: Some(copy_name(0)),
                },
                CheckpointDisk {
                    original: "/a/base.img".into(),
                    read_only: true,
                    copy: None,
                },
            ],
        };
        write(dir.path(), &disks).unwrap();
        let back: CheckpointDisks =
            serde_json::from_slice(&std::fs::read(dir.path().join(SANDBOX_FILE)).unwrap()).unwrap();
        assert_eq!(back, disks);
        assert!(is_plain_file_name("disk-0.img"));
        for bad in ["", ".", "..", "../x", "/etc/passwd", "a/b"] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_directory_without_a_snapshot_is_a_clean_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_layout(dir.path()).unwrap_err();
        assert!(matches!(err, SandboxError::BadCheckpoint { .. }), "{err}");
    }
}
