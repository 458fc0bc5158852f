//! How Firecracker's two snapshot paths map onto a dormouse snapshot directory.
//!
//! `snapshot_path` names the dormouse snapshot *directory* (`state.bin`, `memory.bin`,
//! `manifest.json`, and `firecracker.json` with the drive and interface ids), and
//! `mem_file_path` becomes a second name (a hard link) of that directory's `memory.bin`. A
//! restore needs all three of dormouse's files together, checked against each other (ids,
//! sizes, checksums, a diff's parent), which two loose files could not guarantee; the link
//! costs nothing (no copy, the file stays sparse) and lets a client that looks at
//! `mem_file_path` find the memory. A load takes the directory and insists that its memory path
//! is that same file, so a restore can never pair a state with foreign memory.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm::VmController;

use super::error::FcError;
use super::types::{SnapshotCreateParams, SnapshotType};

/// The companion file holding the ids Firecracker's API names devices by.
pub const IDS_FILE: &str = "firecracker.json";
/// Far more than the ids of the devices a VM can have.
const MAX_IDS_BYTES: u64 = 1 << 20;

/// Firecracker's ids of a VM's devices, in device order (what a restore's overrides and later
/// PATCHes are matched against).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIds {
    pub drives: Vec<String>,
    pub nets: Vec<String>,
}

fn is_ids_file(name: &OsStr) -> bool {
    name == OsStr::new(IDS_FILE)
}

/// An absolute path: the snapshot layer wants one, and Firecracker resolves relative paths
/// against its working directory, which is this process's.
fn absolute(path: &str, field: &str) -> Result<PathBuf, FcError> {
    if path.is_empty() {
        return Err(FcError::bad(format!("{field} is empty")));
    }
    std::path::absolute(path).map_err(|e| FcError::bad(format!("{field} {path:?}: {e}")))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// `PUT /snapshot/create` on a paused VM.
pub fn create(
    controller: &VmController,
    params: &SnapshotCreateParams,
    ids: &DeviceIds,
) -> Result<(), FcError> {
    let dir = absolute(&params.snapshot_path, "snapshot_path")?;
    let mem = absolute(&params.mem_file_path, "mem_file_path")?;
    if mem == dir {
        return Err(FcError::bad(
            "snapshot_path and mem_file_path must be different paths",
        ));
    }
    if dir.is_file() {
        // Firecracker overwrites its state file; here the path becomes a directory, so a
        // previous Firecracker state file there cannot be replaced silently.
        return Err(FcError::unsupported(
            format!("snapshot_path {} naming an existing file", dir.display()),
            "dormouse writes a snapshot directory at snapshot_path (docs/firecracker.md); \
             remove the file or pick another path",
        ));
    }
    let memory = dir.join(snapshot::MEMORY_FILE);
    if mem.starts_with(&dir) && mem != memory {
        // Anything else in the directory would make the next snapshot there refuse it.
        return Err(FcError::unsupported(
            format!("mem_file_path {} inside snapshot_path", mem.display()),
            "the snapshot directory holds only dormouse's files; put the memory file beside it \
             (or name <snapshot_path>/memory.bin)",
        ));
    }
    let diff = params.snapshot_type == SnapshotType::Diff;
    let policy = snapshot::TargetPolicy {
        replace: true,
        companions: Some(is_ids_file),
    };
    let outcome = controller
        .snapshot(&dir, diff, policy)
        .map_err(|e| FcError::bad(format!("Cannot create snapshot: {e}")))?;
    let ids_json = serde_json::to_vec_pretty(ids)
        .map_err(|e| FcError::bad(format!("Cannot create snapshot: {e}")))?;
    std::fs::write(dir.join(IDS_FILE), ids_json).map_err(|e| {
        FcError::bad(format!(
            "Cannot create snapshot: writing {}: {e}",
            dir.join(IDS_FILE).display()
        ))
    })?;
    if !same_file(&memory, &mem) {
        match std::fs::symlink_metadata(&mem) {
            Ok(meta) if meta.is_dir() => {
                return Err(FcError::bad(format!(
                    "mem_file_path {} is a directory",
                    mem.display()
                )))
            }
            // Firecracker overwrites the memory file of an earlier snapshot.
            Ok(_) => std::fs::remove_file(&mem)
                .map_err(|e| FcError::bad(format!("Cannot replace {}: {e}", mem.display())))?,
            Err(_) => {}
        }
        std::fs::hard_link(&memory, &mem).map_err(|e| {
            if e.kind() == std::io::ErrorKind::CrossesDevices {
                FcError::unsupported(
                    format!("mem_file_path {} on another file system", mem.display()),
                    "it is linked to the snapshot directory's memory.bin, not copied; \
                     put it beside snapshot_path",
                )
            } else {
                FcError::bad(format!("Cannot link {}: {e}", mem.display()))
            }
        })?;
    }
    tracing::info!(
        "Firecracker snapshot {} ({} pages) in {:?}, memory at {}",
        dir.display(),
        outcome.pages_written,
        outcome.duration,
        mem.display()
    );
    Ok(())
}

/// A snapshot directory to load and the ids its VM had.
pub struct Loadable {
    pub dir: PathBuf,
    pub ids: DeviceIds,
}

/// Checks a `PUT /snapshot/load`'s paths against the mapping above.
pub fn loadable(snapshot_path: &str, mem_path: &str) -> Result<Loadable, FcError> {
    let dir = absolute(snapshot_path, "snapshot_path")?;
    if !dir.is_dir() {
        return Err(FcError::unsupported(
            format!("snapshot_path {} (not a directory)", dir.display()),
            "dormouse loads the snapshot directory its /snapshot/create wrote at snapshot_path \
             (docs/firecracker.md); Firecracker's own state files cannot be loaded",
        ));
    }
    let mem = absolute(mem_path, "mem_backend.backend_path")?;
    let memory = dir.join(snapshot::MEMORY_FILE);
    if !same_file(&memory, &mem) {
        return Err(FcError::unsupported(
            format!("memory file {} (not {})", mem.display(), memory.display()),
            "a snapshot's memory is checked against its state; pass the mem_file_path the \
             snapshot was created with (a link to the directory's memory.bin) or that file",
        ));
    }
    let ids_path = dir.join(IDS_FILE);
    let ids = match std::fs::File::open(&ids_path) {
        Ok(file) => {
            // Bounded: the file is input like any other in a snapshot directory.
            let mut bytes = Vec::new();
            file.take(MAX_IDS_BYTES + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| FcError::bad(format!("{}: {e}", ids_path.display())))?;
            if bytes.len() as u64 > MAX_IDS_BYTES {
                return Err(FcError::bad(format!(
                    "{}: larger than {MAX_IDS_BYTES} bytes",
                    ids_path.display()
                )));
            }
            serde_json::from_slice(&bytes)
                .map_err(|e| FcError::bad(format!("{}: {e}", ids_path.display())))?
        }
        // A snapshot made through dormouse's own API: devices have no Firecracker ids.
        Err(_) => DeviceIds::default(),
    };
    Ok(Loadable { dir, ids })
}
