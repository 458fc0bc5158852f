//! Content-addressed chunks: `chunks/<sha256 of the raw bytes>`, zstd-compressed. A chunk read
//! back is decompressed into a buffer of exactly its expected length (a bomb cannot grow it)
//! and its hash is checked, so a damaged chunk fails loudly instead of serving wrong bytes.

use sha2::{Digest, Sha256};

use crate::error::{Result, StoreError};

/// Default chunk size: see docs/store.md for the measurements behind it.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Chunk sizes a manifest may declare (bounds what one read may allocate).
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// zstd level 3 (its default): fast enough to keep up with a disk; guest memory compresses well.
const ZSTD_LEVEL: i32 = 3;
const PREFIX: &str = "chunks/";

pub fn chunk_key(hash: &str) -> String {
    format!("{PREFIX}{hash}")
}

/// The hash named by a chunk key, if it is one.
pub fn hash_of_key(key: &str) -> Option<&str> {
    key.strip_prefix(PREFIX).filter(|h| is_hash(h))
}

pub(crate) const CHUNKS_PREFIX: &str = PREFIX;

pub fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn hash_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let mut out = String::with_capacity(64);
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

pub fn compress(data: &[u8]) -> Result<Vec<u8>> {
    zstd::bulk::compress(data, ZSTD_LEVEL)
        .map_err(|e| StoreError::Invalid(format!("zstd compression failed: {e}")))
}

/// Largest compressed form of `len` bytes zstd may produce (what a read may fetch).
pub fn max_compressed_len(len: u64) -> u64 {
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    zstd::zstd_safe::compress_bound(len) as u64
}

/// Decompresses a stored chunk that must hold `expected_len` bytes hashing to `hash`.
pub fn decode(hash: &str, compressed: &[u8], expected_len: usize) -> Result<Vec<u8>> {
    let corrupt = |reason: String| StoreError::CorruptChunk {
        hash: hash.to_string(),
        reason,
    };
    let data = zstd::bulk::decompress(compressed, expected_len).map_err(|e| {
        corrupt(format!(
            "does not decompress into {expected_len} bytes: {e}"
        ))
    })?;
    if data.len() != expected_len {
        return Err(corrupt(format!(
            "decompresses to {} bytes, expected {expected_len}",
            data.len()
        )));
    }
    let actual = hash_hex(&data);
    if actual != hash {
        return Err(corrupt(format!("its content hashes to {actual}")));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_detection() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let hash = hash_hex(&data);
        let packed = compress(&data).unwrap();
        assert!(packed.len() < data.len() / 10);
        assert!(packed.len() as u64 <= max_compressed_len(data.len() as u64));
        assert_eq!(decode(&hash, &packed, data.len()).unwrap(), data);

        // Wrong expected length (a bomb or a lie) and a damaged byte both fail, naming the chunk.
        let err = decode(&hash, &packed, data.len() - 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&hash), "{err}");
        let other = compress(&data[1..]).unwrap();
        let err = decode(&hash, &other, data.len() - 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("hashes to"), "{err}");
        let mut flipped = packed.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        assert!(decode(&hash, &flipped, data.len()).is_err());
    }

    #[test]
    fn keys_name_their_hash() {
        let hash = hash_hex(b"x");
        assert_eq!(hash_of_key(&chunk_key(&hash)), Some(hash.as_str()));
        assert_eq!(hash_of_key("chunks/nothex"), None);
        assert_eq!(hash_of_key("snapshots/a/manifest.json"), None);
    }
}
