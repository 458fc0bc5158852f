//! Feeds arbitrary bytes to the `state.bin` reader: it must return an error, never panic,
//! hang or allocate without bound. Half the inputs get a valid header around the fuzz bytes so
//! the payload decoders are exercised past the checksum: today's CBOR (format 3) and the
//! postcard of format 2 that restore still reads.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct FuzzState {
    vcpus: Vec<FuzzVcpu>,
    devices: BTreeMap<String, FuzzDevice>,
    blob: Vec<u8>,
    note: Option<String>,
    flags: (bool, u8, i64, f64),
}

#[derive(Debug, Serialize, Deserialize)]
struct FuzzVcpu {
    id: u32,
    regs: [u64; 18],
    msrs: Vec<(u32, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
enum FuzzDevice {
    Serial {
        lsr: u8,
        fifo: Vec<u8>,
    },
    Virtio {
        features: u64,
        queues: Vec<(u16, u64, u64, u64)>,
    },
    Absent,
}

/// Format 2 payloads are positional postcard of the same shape.
impl snapshot::SavedState for FuzzState {
    fn from_postcard(_version: u32, payload: &[u8]) -> Result<Self, String> {
        snapshot::decode_postcard(payload)
    }
}

/// A `state.bin` image with a correct header and CRC around `payload`.
fn sealed(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut image = Vec::with_capacity(32 + payload.len());
    image.extend_from_slice(b"DMSTATE\0");
    image.extend_from_slice(&version.to_le_bytes());
    image.extend_from_slice(&0u32.to_le_bytes());
    image.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    image.extend_from_slice(&crc32(payload).to_le_bytes());
    let header_crc = crc32(&image);
    image.extend_from_slice(&header_crc.to_le_bytes());
    image.extend_from_slice(payload);
    image
}

/// Bitwise CRC-32 (IEEE), matching the format's checksum; speed does not matter here.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((&selector, rest)) if selector & 1 == 1 => {
            let version = if selector & 2 == 2 {
                snapshot::FORMAT_VERSION
            } else {
                snapshot::OLDEST_READABLE_FORMAT
            };
            let image = sealed(version, rest);
            let _ = snapshot::decode_state::<FuzzState>(&image);
        }
        _ => {
            let _ = snapshot::decode_state::<FuzzState>(data);
        }
    }
});
