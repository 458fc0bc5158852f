//! The store's snapshot manifest, `snapshots/<name>/manifest.json`: every file of the snapshot
//! directory, small ones inline, the rest as chunk lists. Written last by a push, so a snapshot
//! exists for readers exactly when its manifest does. Read back as hostile input: bounded size,
//! every field checked before anything is fetched or allocated from it.

use std::collections::HashSet;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::chunk::{is_hash, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::error::{Result, StoreError};
use crate::url::valid_name;

/// Bump on any change to what a manifest holds.
pub const STORE_FORMAT: u32 = 1;
/// 1 TiB of memory in 4 MiB chunks lists 262144 chunks (~20 MiB of JSON); nothing bigger.
pub const MAX_STORE_MANIFEST_LEN: u64 = 64 << 20;
/// Files up to this size are stored inside the manifest (a snapshot's `manifest.json`,
/// `pages.bitmap`, usually `state.bin`): one object fewer per file.
pub const INLINE_MAX: u64 = 64 << 10;
/// A snapshot directory holds a handful of files (plus disk copies).
pub const MAX_FILES: usize = 256;
/// Per-file bound, as for snapshot memory files.
pub const MAX_FILE_LEN: u64 = snapshot::MAX_MEMORY_SIZE;

pub fn manifest_key(name: &str) -> String {
    format!("{SNAPSHOTS_PREFIX}{name}/manifest.json")
}

pub(crate) const SNAPSHOTS_PREFIX: &str = "snapshots/";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreManifest {
    pub format: u32,
    pub name: String,
    pub created_unix_secs: u64,
    /// The pushed snapshot's id (from its own manifest.json), for humans and logs.
    pub snapshot_id: String,
    pub chunk_size: u64,
    pub files: Vec<StoredFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    pub name: String,
    pub len: u64,
    pub content: Content,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    /// The bytes, base64.
    Inline(String),
    /// One entry per `chunk_size` piece of the file; `None` for an all-zero piece (a hole).
    Chunks(Vec<Option<String>>),
}

impl StoreManifest {
    /// Every chunk hash it references.
    pub fn chunk_hashes(&self) -> impl Iterator<Item = &str> {
        self.files.iter().flat_map(|f| match &f.content {
            Content::Chunks(chunks) => chunks.iter().flatten().map(String::as_str).collect(),
            Content::Inline(_) => Vec::new(),
        })
    }

    pub fn parse(bytes: &[u8], key: &str) -> Result<Self> {
        let invalid = |reason: String| StoreError::InvalidManifest {
            key: key.to_string(),
            reason,
        };
        let manifest: StoreManifest =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        manifest.validate().map_err(invalid)?;
        Ok(manifest)
    }

    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|e| StoreError::Invalid(e.to_string()))
    }

    /// Checks everything a pull relies on; the error names the first problem.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.format != STORE_FORMAT {
            return Err(format!(
                "store format {} is not supported (this dormouse reads {STORE_FORMAT})",
                self.format
            ));
        }
        if !valid_name(&self.name) {
            return Err(format!("snapshot name {:?} is not valid", self.name));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
            || !self.chunk_size.is_power_of_two()
        {
            return Err(format!(
                "chunk size {} is not a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                self.chunk_size
            ));
        }
        if self.files.len() > MAX_FILES {
            return Err(format!("more than {MAX_FILES} files"));
        }
        let mut names = HashSet::new();
        for file in &self.files {
            if !valid_name(&file.name) || file.name.starts_with('.') {
                return Err(format!("file name {:?} is not a plain name", file.name));
            }
            if !names.insert(file.name.as_str()) {
                return Err(format!("file {:?} is listed twice", file.name));
            }
            if file.len > MAX_FILE_LEN {
                return Err(format!(
                    "file {:?} is longer than {MAX_FILE_LEN}",
                    file.name
                ));
            }
            match &file.content {
                Content::Inline(data) => {
                    let decoded = decode_inline(data)
                        .map_err(|e| format!("file {:?}: bad base64: {e}", file.name))?;
                    if decoded.len() as u64 != file.len || file.len > INLINE_MAX {
                        return Err(format!(
                            "file {:?}: inline data of {} bytes for a length of {}",
                            file.name,
                            decoded.len(),
                            file.len
                        ));
                    }
                }
                Content::Chunks(chunks) => {
                    if chunks.len() as u64 != file.len.div_ceil(self.chunk_size) {
                        return Err(format!(
                            "file {:?}: {} chunks for {} bytes",
                            file.name,
                            chunks.len(),
                            file.len
                        ));
                    }
                    if let Some(bad) = chunks.iter().flatten().find(|h| !is_hash(h)) {
                        return Err(format!(
                            "file {:?}: chunk {bad:?} is not a sha256 in hex",
                            file.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn encode_inline(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub(crate) fn decode_inline(data: &str) -> std::result::Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::STANDARD.decode(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoreManifest {
        StoreManifest {
            format: STORE_FORMAT,
            name: "snap".into(),
            created_unix_secs: 1,
            snapshot_id: "x".into(),
            chunk_size: 1 << 20,
            files: vec![
                StoredFile {
                    name: "state.bin".into(),
                    len: 3,
                    content: Content::Inline(encode_inline(b"abc")),
                },
                StoredFile {
                    name: "memory.bin".into(),
                    len: (2 << 20) + 1,
                    content: Content::Chunks(vec![
                        Some("a".repeat(64)),
                        None,
                        Some("b".repeat(64)),
                    ]),
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_lists_its_chunks() {
        let m = sample();
        let parsed = StoreManifest::parse(&m.to_json().unwrap(), "k").unwrap();
        assert_eq!(parsed, m);
        assert_eq!(parsed.chunk_hashes().count(), 2);
    }

    #[test]
    fn refuses_hostile_manifests() {
        type Damage = fn(&mut StoreManifest);
        let cases: Vec<(Damage, &str)> = vec![
            (|m| m.format = 99, "format"),
            (|m| m.chunk_size = 3, "chunk size"),
            (|m| m.chunk_size = 1 << 40, "chunk size"),
            (|m| m.files[0].name = "../x".into(), "plain name"),
            (|m| m.files[1].name = "state.bin".into(), "twice"),
            (|m| m.files[0].len = 4, "inline"),
            (|m| m.files[1].len = 1, "chunks for"),
            (
                |m| m.files[1].content = Content::Chunks(vec![Some("zz".into()), None, None]),
                "sha256",
            ),
        ];
        for (damage, needle) in cases {
            let mut m = sample();
            damage(&mut m);
            let err = StoreManifest::parse(&m.to_json().unwrap(), "k")
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        assert!(StoreManifest::parse(b"{", "k").is_err());
    }
}
