//! Whether a snapshot can be restored on this host. The VMM gathers the host facts (it owns the
//! KVM handles); this module only compares.

use crate::error::{Result, SnapshotError};
use crate::manifest::{HostInfo, Manifest};

/// The host a restore is attempted on, described the same way as the snapshot's host.
pub type HostFacts = HostInfo;

/// Refuses (listing every reason) when the snapshot's host kind or paging depth differ from
/// `host`, or when the guest was shown CPU features this host lacks.
pub fn check_compatible(manifest: &Manifest, host: &HostFacts) -> Result<()> {
    let taken_on = &manifest.host;
    let mut reasons = Vec::new();
    if taken_on.kind != host.kind {
        reasons.push(format!(
            "snapshot taken on host kind {:?}, this host is {:?}",
            taken_on.kind, host.kind
        ));
    }
    if taken_on.paging_levels != host.paging_levels {
        reasons.push(format!(
            "snapshot uses {}-level paging, this host provides {}-level",
            taken_on.paging_levels, host.paging_levels
        ));
    }
    let missing: Vec<&str> = taken_on
        .cpu_features
        .iter()
        .filter(|feature| !host.cpu_features.contains(feature))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        reasons.push(format!("host lacks CPU features: {}", missing.join(", ")));
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(SnapshotError::Incompatible { reasons })
    }
}
