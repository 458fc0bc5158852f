//! `state.bin`: the VMM's serialized device/vCPU state behind a checked header.
//!
//! Layout (little endian):
//!
//! | offset | size | field                                        |
//! |--------|------|----------------------------------------------|
//! | 0      | 8    | magic `DMSTATE\0`                            |
//! | 8      | 4    | format version                               |
//! | 12     | 4    | reserved, zero                               |
//! | 16     | 8    | payload length                               |
//! | 24     | 4    | CRC32 of the payload                         |
//! | 28     | 4    | CRC32 of bytes 0..28 (protects the length)   |
//! | 32     | n    | payload: the encoded state (see below)       |
//!
//! The header CRC means a corrupted length field is caught before it is trusted, and the file
//! length must match the header exactly, so nothing is allocated on the strength of a bad header.
//!
//! Payload encodings, by format version (docs/snapshot-compat.md):
//! - 3 (current): CBOR with named struct fields and named enum variants. A field added later
//!   with `#[serde(default)]` decodes from an older file as its default, so adding state does not
//!   orphan existing snapshots; removing or renaming a field, or changing its type, needs a
//!   version bump and a conversion.
//! - 2: `postcard` (positional, not self-describing): read only while the saved types keep the
//!   shape they had in format 2; the snapshot corpus test (`tests/tests/snapshot_corpus.rs`)
//!   fails the first time they do not, which is when a frozen copy of the v2 types (or dropping
//!   v2, once a release with v3 has shipped) must be decided.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Result, SnapshotError};
use crate::fsutil;
use crate::{FORMAT_VERSION, OLDEST_READABLE_FORMAT};

pub const STATE_FILE: &str = "state.bin";
const STATE_MAGIC: [u8; 8] = *b"DMSTATE\0";
pub(crate) const STATE_HEADER_LEN: usize = 32;
/// Far above any real VM state (a few hundred KiB); bounds what a corrupt file can make us read.
pub const MAX_STATE_PAYLOAD: u64 = 256 << 20;
/// The last format whose payload is `postcard`.
const LAST_POSTCARD_FORMAT: u32 = 2;
/// The CBOR decoder reads a byte or text string of at most this many bytes in one piece (the
/// largest saved blob is a 4 KiB `kvm_xsave`); longer ones are an error, not an allocation.
const CBOR_SCRATCH: usize = 64 << 10;

/// A type `state.bin` holds. Format 3 and later are CBOR with named fields, read through serde;
/// formats up to 2 are positional `postcard`, which only the type's own frozen copy of its old
/// shape can read ([`SavedState::from_postcard`]; docs/snapshot-compat.md).
pub trait SavedState: Serialize + DeserializeOwned {
    /// Decodes a `postcard` payload written by format `version` (≤ 2). A type whose shape has
    /// not changed since can read it as itself ([`decode_postcard`]); one that has, decodes its
    /// frozen old shape and converts.
    fn from_postcard(version: u32, payload: &[u8]) -> std::result::Result<Self, String>;
}

/// Decodes a whole `postcard` payload as `T` (no trailing bytes), for [`SavedState`] impls.
pub fn decode_postcard<T: DeserializeOwned>(payload: &[u8]) -> std::result::Result<T, String> {
    let (value, rest) = postcard::take_from_bytes::<T>(payload).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} unused bytes after the state", rest.len()));
    }
    Ok(value)
}

/// Serializes `value` into the full `state.bin` byte image (header + payload).
pub fn encode_state<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut payload = Vec::new();
    ciborium::into_writer(value, &mut payload).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    if payload.len() as u64 > MAX_STATE_PAYLOAD {
        return Err(SnapshotError::Encode(format!(
            "state is {} bytes, above the {MAX_STATE_PAYLOAD}-byte limit",
            payload.len()
        )));
    }
    let mut image = Vec::with_capacity(STATE_HEADER_LEN + payload.len());
    image.extend_from_slice(&STATE_MAGIC);
    image.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    image.extend_from_slice(&0u32.to_le_bytes());
    image.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    image.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let header_crc = crc32fast::hash(&image);
    image.extend_from_slice(&header_crc.to_le_bytes());
    image.extend_from_slice(&payload);
    Ok(image)
}

/// Parses a `state.bin` byte image. Every malformed input is an error, never a panic.
pub fn decode_state<T: SavedState>(bytes: &[u8]) -> Result<T> {
    decode_state_at(bytes, Path::new(STATE_FILE))
}

/// Checks the header and payload checksum of a `state.bin` image; returns the format version
/// and the payload.
pub(crate) fn verify_state_image<'b>(bytes: &'b [u8], path: &Path) -> Result<(u32, &'b [u8])> {
    let path_buf = || path.to_path_buf();
    let (header, payload) =
        bytes
            .split_at_checked(STATE_HEADER_LEN)
            .ok_or_else(|| SnapshotError::Truncated {
                path: path_buf(),
                expected: STATE_HEADER_LEN as u64,
                actual: bytes.len() as u64,
            })?;
    let magic = field::<8>(header, 0);
    if magic != STATE_MAGIC {
        return Err(SnapshotError::BadMagic {
            path: path_buf(),
            what: "state",
            found: magic,
        });
    }
    let stored_header_crc = u32::from_le_bytes(field::<4>(header, 28));
    if crc32fast::hash(header.get(..28).unwrap_or_default()) != stored_header_crc {
        return Err(SnapshotError::HeaderChecksum { path: path_buf() });
    }
    let version = u32::from_le_bytes(field::<4>(header, 8));
    check_format_version(version, path)?;
    let payload_len = u64::from_le_bytes(field::<8>(header, 16));
    if payload_len > MAX_STATE_PAYLOAD {
        return Err(SnapshotError::TooLarge {
            path: path_buf(),
            len: payload_len,
            max: MAX_STATE_PAYLOAD,
        });
    }
    if payload.len() as u64 != payload_len {
        return Err(SnapshotError::Truncated {
            path: path_buf(),
            expected: (STATE_HEADER_LEN as u64).saturating_add(payload_len),
            actual: bytes.len() as u64,
        });
    }
    let expected_crc = u32::from_le_bytes(field::<4>(header, 24));
    let actual_crc = crc32fast::hash(payload);
    if expected_crc != actual_crc {
        return Err(SnapshotError::PayloadChecksum {
            path: path_buf(),
            expected: expected_crc,
            actual: actual_crc,
        });
    }
    Ok((version, payload))
}

/// Refuses a format this build cannot read, naming both versions.
pub(crate) fn check_format_version(found: u32, path: &Path) -> Result<()> {
    if (OLDEST_READABLE_FORMAT..=FORMAT_VERSION).contains(&found) {
        return Ok(());
    }
    Err(SnapshotError::UnsupportedVersion {
        path: path.to_path_buf(),
        found,
        oldest: OLDEST_READABLE_FORMAT,
        newest: FORMAT_VERSION,
    })
}

fn decode_state_at<T: SavedState>(bytes: &[u8], path: &Path) -> Result<T> {
    let (version, payload) = verify_state_image(bytes, path)?;
    let decode_error = |reason: String| SnapshotError::Decode {
        path: path.to_path_buf(),
        reason,
    };
    if version <= LAST_POSTCARD_FORMAT {
        return T::from_postcard(version, payload).map_err(decode_error);
    }
    let mut rest = payload;
    let mut scratch = vec![0u8; CBOR_SCRATCH];
    let value = ciborium::de::from_reader_with_buffer(&mut rest, &mut scratch)
        .map_err(|e| decode_error(e.to_string()))?;
    if !rest.is_empty() {
        return Err(decode_error(format!(
            "{} unused bytes after the state",
            rest.len()
        )));
    }
    Ok(value)
}

/// Copies the fixed-size field at `offset` out of the (already length-checked) header.
fn field<const N: usize>(header: &[u8], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = header.get(offset..offset + N) {
        out.copy_from_slice(src);
    }
    out
}

pub(crate) fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// Writes `DIR/state.bin` atomically and durably.
pub fn write_state<T: Serialize>(dir: &Path, value: &T) -> Result<()> {
    write_state_with(dir, value, true)
}

pub(crate) fn write_state_with<T: Serialize>(dir: &Path, value: &T, sync: bool) -> Result<()> {
    let image = encode_state(value)?;
    fsutil::write_file_atomic(&state_path(dir), &image, sync)
}

/// Reads and checks `DIR/state.bin`.
pub fn read_state<T: SavedState>(dir: &Path) -> Result<T> {
    let path = state_path(dir);
    let bytes = fsutil::read_bounded(&path, MAX_STATE_PAYLOAD + STATE_HEADER_LEN as u64)?;
    decode_state_at(&bytes, &path)
}
