//! `manifest.json`: the small, human-readable description of a snapshot directory. It is written
//! last, so its presence marks a complete snapshot.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Result, SnapshotError};
use crate::fsutil;
use crate::layout::{self, MemoryRegion, PAGE_SIZE};
use crate::{FORMAT_VERSION, OLDEST_READABLE_FORMAT};

pub const MANIFEST_FILE: &str = "manifest.json";
/// A manifest is a few KiB; anything much larger is not one.
pub const MAX_MANIFEST_LEN: u64 = 1 << 20;
/// Refuse memory sizes no host has (keeps derived allocations such as bitmaps bounded).
pub const MAX_MEMORY_SIZE: u64 = 1 << 44;
const MAX_IDENTITY_LEN: usize = 4096;

/// Random 128-bit snapshot identity, 32 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SnapshotId(String);

impl SnapshotId {
    pub fn random() -> Result<Self> {
        Ok(Self(fsutil::random_hex(16)?))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn is_well_formed(&self) -> bool {
        self.0.len() == 32
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// `memory.bin` holds every non-zero page; holes read as zero.
    Full,
    /// `memory.bin` holds only the pages set in `pages.bitmap`; the rest come from the parent.
    Diff,
}

/// Where a diff snapshot's parent lives and which snapshot it must be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// Relative paths are relative to the child's directory.
    pub dir: PathBuf,
    pub id: SnapshotId,
}

/// Facts about the host the snapshot was taken on, checked by [`crate::check_compatible`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Virtualization flavour, e.g. `"kvm-vmx"`, `"kvm-pvm"`.
    pub kind: String,
    /// Guest paging depth in use (4 or 5 levels).
    pub paging_levels: u8,
    /// CPU features the guest was shown and may rely on.
    #[serde(default)]
    pub cpu_features: Vec<String>,
}

/// Page accounting for the memory file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCounts {
    /// Pages covered by the memory file.
    pub total: u64,
    /// Pages whose bytes are stored in this snapshot's `memory.bin`.
    pub written: u64,
    /// Pages the VMM reported dirty (equals `written` for diffs; 0 when no dirty info was used).
    pub dirty: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub snapshot_id: SnapshotId,
    pub kind: SnapshotKind,
    pub parent: Option<ParentRef>,
    pub created_unix_secs: u64,
    /// Same instant as `created_unix_secs`, for humans (`YYYY-MM-DDTHH:MM:SSZ`).
    pub created_utc: String,
    pub vcpus: u32,
    /// Identity strings the VMM chooses (e.g. a hash or path+mtime) for the boot artefacts.
    pub kernel_id: String,
    pub rootfs_id: String,
    pub host: HostInfo,
    /// Total guest RAM in bytes (sum of region sizes = `memory.bin` length).
    pub memory_size: u64,
    pub regions: Vec<MemoryRegion>,
    pub pages: PageCounts,
}

/// What the VMM knows about the VM being snapshotted; copied into the manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub vcpus: u32,
    pub kernel_id: String,
    pub rootfs_id: String,
    pub host: HostInfo,
}

pub(crate) fn manifest_path(dir: &Path) -> PathBuf {
    dir.join(MANIFEST_FILE)
}

impl Manifest {
    /// A manifest for a snapshot taken now.
    pub fn new(
        kind: SnapshotKind,
        parent: Option<ParentRef>,
        meta: &SnapshotMeta,
        regions: Vec<MemoryRegion>,
        pages: PageCounts,
    ) -> Result<Self> {
        let created_unix_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let memory_size = regions
            .iter()
            .map(|r| r.size)
            .fold(0u64, u64::saturating_add);
        Ok(Self {
            format_version: FORMAT_VERSION,
            snapshot_id: SnapshotId::random()?,
            kind,
            parent,
            created_unix_secs,
            created_utc: format_utc(created_unix_secs),
            vcpus: meta.vcpus,
            kernel_id: meta.kernel_id.clone(),
            rootfs_id: meta.rootfs_id.clone(),
            host: meta.host.clone(),
            memory_size,
            regions,
            pages,
        })
    }

    /// Pages in the memory file.
    pub fn page_count(&self) -> u64 {
        self.memory_size / PAGE_SIZE
    }

    /// Parses and validates manifest JSON. `path` is only used in error messages.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|source| SnapshotError::ManifestParse {
                path: path.to_path_buf(),
                source,
            })?;
        manifest
            .validate()
            .map_err(|reason| SnapshotError::InvalidManifest {
                path: path.to_path_buf(),
                reason,
            })?;
        Ok(manifest)
    }

    pub fn to_json(&self) -> Result<Vec<u8>> {
        let mut json =
            serde_json::to_vec_pretty(self).map_err(|e| SnapshotError::Encode(e.to_string()))?;
        json.push(b'\n');
        Ok(json)
    }

    /// Checks internal consistency; the error names the first problem found.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(OLDEST_READABLE_FORMAT..=FORMAT_VERSION).contains(&self.format_version) {
            let hint = if self.format_version > FORMAT_VERSION {
                "written by a newer dormouse"
            } else {
                "written by an older dormouse that this version no longer reads"
            };
            return Err(format!(
                "snapshot format {} is not supported: this dormouse reads formats \
                 {OLDEST_READABLE_FORMAT} to {FORMAT_VERSION} ({hint})",
                self.format_version
            ));
        }
        if !self.snapshot_id.is_well_formed() {
            return Err("snapshot_id is not 32 lowercase hex digits".into());
        }
        let file_len = layout::validate_layout(&self.regions)?;
        if file_len != self.memory_size {
            return Err(format!(
                "memory_size {} does not match the regions ({file_len} bytes)",
                self.memory_size
            ));
        }
        if self.memory_size > MAX_MEMORY_SIZE {
            return Err(format!(
                "memory_size {} exceeds {MAX_MEMORY_SIZE}",
                self.memory_size
            ));
        }
        let total = self.page_count();
        if self.pages.total != total || self.pages.written > total || self.pages.dirty > total {
            return Err(format!(
                "page counts {:?} do not fit {total} pages",
                self.pages
            ));
        }
        match (&self.kind, &self.parent) {
            (SnapshotKind::Full, Some(_)) => {
                return Err("a full snapshot cannot have a parent".into())
            }
            (SnapshotKind::Diff, None) => return Err("a diff snapshot needs a parent".into()),
            (SnapshotKind::Diff, Some(parent)) => {
                if !parent.id.is_well_formed() {
                    return Err("parent id is not 32 lowercase hex digits".into());
                }
                if parent.dir.as_os_str().is_empty() {
                    return Err("parent dir is empty".into());
                }
            }
            (SnapshotKind::Full, None) => {}
        }
        for (name, value) in [
            ("kernel_id", &self.kernel_id),
            ("rootfs_id", &self.rootfs_id),
            ("host.kind", &self.host.kind),
        ] {
            if value.len() > MAX_IDENTITY_LEN {
                return Err(format!("{name} is longer than {MAX_IDENTITY_LEN} bytes"));
            }
        }
        Ok(())
    }

    /// Writes `DIR/manifest.json` atomically and durably.
    pub fn write(&self, dir: &Path) -> Result<()> {
        self.write_with(dir, true)
    }

    pub(crate) fn write_with(&self, dir: &Path, sync: bool) -> Result<()> {
        fsutil::write_file_atomic(&manifest_path(dir), &self.to_json()?, sync)
    }

    /// Reads and validates `DIR/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = manifest_path(dir);
        let bytes = fsutil::read_bounded(&path, MAX_MANIFEST_LEN)?;
        Self::from_json(&bytes, &path)
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (proleptic Gregorian calendar, UTC).
fn format_utc(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm, on unsigned values shifted to the 0000-03-01 era.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_763_839_261), "2025-11-22T19:21:01Z");
    }

    #[test]
    fn ids_are_random_and_well_formed() {
        let a = SnapshotId::random().unwrap();
        let b = SnapshotId::random().unwrap();
        assert_ne!(a, b);
        assert!(a.is_well_formed());
        assert!(!SnapshotId("ABC".into()).is_well_formed());
    }
}
