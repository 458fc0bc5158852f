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
//! | 32     | n    | payload: `postcard` encoding of the state    |
//!
//! The header CRC means a corrupted length field is caught before it is trusted, and the file
//! length must match the header exactly, so nothing is allocated on the strength of a bad header.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Result, SnapshotError};
use crate::fsutil;
use crate::FORMAT_VERSION;

pub const STATE_FILE: &str = "state.bin";
const STATE_MAGIC: [u8; 8] = *b"DMSTATE\0";
pub(crate) const STATE_HEADER_LEN: usize = 32;
/// Far above any real VM state (a few hundred KiB); bounds what a corrupt file can make us read.
pub const MAX_STATE_PAYLOAD: u64 = 256 << 20;

/// Serializes `value` into the full `state.bin` byte image (header + payload).
pub fn encode_state<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let payload = postcard::to_stdvec(value).map_err(|e| SnapshotError::Encode(e.to_string()))?;
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
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    decode_state_at(bytes, Path::new(STATE_FILE))
}

/// Checks the header and payload checksum of a `state.bin` image; returns the payload.
pub(crate) fn verify_state_image<'b>(bytes: &'b [u8], path: &Path) -> Result<&'b [u8]> {
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
    if version != FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            path: path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
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
    Ok(payload)
}

fn decode_state_at<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T> {
    let payload = verify_state_image(bytes, path)?;
    let path_buf = || path.to_path_buf();
    let (value, rest) =
        postcard::take_from_bytes::<T>(payload).map_err(|e| SnapshotError::Decode {
            path: path_buf(),
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(SnapshotError::Decode {
            path: path_buf(),
            reason: format!("{} unused bytes after the state", rest.len()),
        });
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
pub fn read_state<T: DeserializeOwned>(dir: &Path) -> Result<T> {
    let path = state_path(dir);
    let bytes = fsutil::read_bounded(&path, MAX_STATE_PAYLOAD + STATE_HEADER_LEN as u64)?;
    decode_state_at(&bytes, &path)
}
