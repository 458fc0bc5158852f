//! dormouse itself driven through its Firecracker-compatible API (`dormouse firecracker`,
//! docs/firecracker.md) by the Firecracker runner, unchanged: the same calls Firecracker gets,
//! so the rows show what the compatibility layer costs next to dormouse's own API rows.
//! Always run (it needs no peer binary): the runner starts a link named `firecracker` to this
//! very binary, as a Firecracker-based worker would after switching.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::firecracker::{Firecracker, FirecrackerVm};
use super::{PeerGuest, PeerVmm};

pub struct DormouseFcApi;

impl PeerVmm for DormouseFcApi {
    type Vm = FirecrackerVm;

    fn name(&self) -> &'static str {
        "dormouse-fc-api"
    }

    fn program(&self) -> &'static str {
        "dormouse firecracker"
    }

    fn provenance(&self) -> &'static str {
        "dormouse through its Firecracker API, driven by the Firecracker runner"
    }

    fn boot(&self, bin: &Path, guest: &PeerGuest, work: &Path) -> anyhow::Result<FirecrackerVm> {
        Firecracker.boot(bin, guest, work)
    }

    fn restore(
        &self,
        bin: &Path,
        guest: &PeerGuest,
        snap_dir: &Path,
        work: &Path,
    ) -> anyhow::Result<FirecrackerVm> {
        Firecracker.restore(bin, guest, snap_dir, work)
    }

    /// The runner's `mem_file_path`: a hard link to the snapshot directory's `memory.bin`.
    fn memory_file(&self, snap_dir: &Path) -> PathBuf {
        Firecracker.memory_file(snap_dir)
    }
}

/// `scratch/fc-api/firecracker` → this binary (dormouse picks its Firecracker front end from
/// the name it was started by).
pub fn link(scratch: &Path) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the dormouse binary")?;
    let dir = scratch.join("fc-api");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let link = dir.join("firecracker");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&exe, &link)
        .with_context(|| format!("linking {} to {}", link.display(), exe.display()))?;
    Ok(link)
}
