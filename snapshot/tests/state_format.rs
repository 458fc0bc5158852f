//! `state.bin` round trips and its refusal of every kind of damage.

mod common;

use std::fs;

use common::{sample_state, TestState};
use serde::{Deserialize, Serialize};
use snapshot::{
    decode_state, encode_state, read_state, write_state, SnapshotError, FORMAT_VERSION,
    OLDEST_READABLE_FORMAT, STATE_FILE,
};

/// A sealed `state.bin` image of `payload` claiming format `version`.
fn sealed(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut image = Vec::new();
    image.extend_from_slice(b"DMSTATE\0");
    image.extend_from_slice(&version.to_le_bytes());
    image.extend_from_slice(&0u32.to_le_bytes());
    image.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    image.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let crc = crc32fast::hash(&image);
    image.extend_from_slice(&crc.to_le_bytes());
    image.extend_from_slice(payload);
    image
}

/// A saved structure as an older dormouse wrote it ...
#[derive(Serialize)]
struct DeviceV1 {
    irq: u32,
    queues: Vec<u16>,
}
#[derive(Serialize)]
struct StateV1 {
    vcpus: u8,
    devices: Vec<DeviceV1>,
}

/// ... and as a newer one reads it: a field added with a default, a device kind added.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct DeviceV2 {
    irq: u32,
    queues: Vec<u16>,
    #[serde(default)]
    needs_reset: bool,
}
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct StateV2 {
    vcpus: u8,
    devices: Vec<DeviceV2>,
    #[serde(default)]
    extra_devices: Vec<DeviceV2>,
}

/// Types only ever written as CBOR: a postcard payload for them is refused.
macro_rules! cbor_only {
    ($($ty:ty),*) => {$(
        impl snapshot::SavedState for $ty {
            fn from_postcard(version: u32, _: &[u8]) -> Result<Self, String> {
                Err(format!("no format {version} shape"))
            }
        }
    )*};
}
cbor_only!(StateV2);

#[test]
fn added_fields_decode_from_older_snapshots_as_their_defaults() {
    let old = StateV1 {
        vcpus: 2,
        devices: vec![DeviceV1 {
            irq: 5,
            queues: vec![256, 256],
        }],
    };
    let image = encode_state(&old).unwrap();
    let new: StateV2 = decode_state(&image).unwrap();
    assert_eq!(
        new,
        StateV2 {
            vcpus: 2,
            devices: vec![DeviceV2 {
                irq: 5,
                queues: vec![256, 256],
                needs_reset: false,
            }],
            extra_devices: vec![],
        }
    );
}

#[test]
fn a_field_added_without_a_default_is_a_clear_decode_error() {
    #[derive(Debug, Serialize, Deserialize)]
    #[allow(dead_code)]
    struct Strict {
        vcpus: u8,
        devices: Vec<DeviceV2>,
        must_have: u64,
    }
    cbor_only!(Strict);
    let image = encode_state(&StateV1 {
        vcpus: 1,
        devices: vec![],
    })
    .unwrap();
    let err = decode_state::<Strict>(&image).unwrap_err();
    assert!(err.to_string().contains("must_have"), "{err}");
}

#[test]
fn format_2_postcard_snapshots_still_decode() {
    assert_eq!(OLDEST_READABLE_FORMAT, 2);
    let state = sample_state();
    let payload = postcard::to_stdvec(&state).unwrap();
    let image = sealed(2, &payload);
    assert_eq!(decode_state::<TestState>(&image).unwrap(), state);
}

#[test]
fn newer_and_too_old_formats_are_refused_naming_both_versions() {
    let payload = &encode_state(&sample_state()).unwrap()[32..];
    for version in [FORMAT_VERSION + 1, 99, OLDEST_READABLE_FORMAT - 1, 0] {
        let err = decode_state::<TestState>(&sealed(version, payload)).unwrap_err();
        assert!(
            matches!(err, SnapshotError::UnsupportedVersion { found, .. } if found == version),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains(&format!("format {version}")), "{text}");
        assert!(
            text.contains(&format!("{OLDEST_READABLE_FORMAT} to {FORMAT_VERSION}")),
            "{text}"
        );
        let newer = version > FORMAT_VERSION;
        assert_eq!(text.contains("newer dormouse"), newer, "{text}");
    }
}

#[test]
fn state_round_trips_through_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let state = sample_state();
    write_state(dir.path(), &state).unwrap();
    let back: TestState = read_state(dir.path()).unwrap();
    assert_eq!(back, state);
    // No temp files are left behind.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
}

#[test]
fn rewriting_state_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = sample_state();
    write_state(dir.path(), &state).unwrap();
    state.note = None;
    state.irqchip.clear();
    write_state(dir.path(), &state).unwrap();
    assert_eq!(read_state::<TestState>(dir.path()).unwrap(), state);
}

#[test]
fn wrong_version_and_magic_are_refused() {
    let image = encode_state(&sample_state()).unwrap();

    let mut future = image.clone();
    future[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    // Re-seal the header so only the version is wrong.
    let crc = crc32fast::hash(&future[..28]);
    future[28..32].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        decode_state::<TestState>(&future),
        Err(SnapshotError::UnsupportedVersion { found, .. }) if found == FORMAT_VERSION + 1
    ));

    let mut foreign = image.clone();
    foreign[0..8].copy_from_slice(b"NOTASNAP");
    assert!(matches!(
        decode_state::<TestState>(&foreign),
        Err(SnapshotError::BadMagic { .. })
    ));
}

#[test]
fn payload_corruption_fails_the_crc() {
    let mut image = encode_state(&sample_state()).unwrap();
    let last = image.len() - 1;
    image[last] ^= 0x40;
    assert!(matches!(
        decode_state::<TestState>(&image),
        Err(SnapshotError::PayloadChecksum { .. })
    ));
}

#[test]
fn every_single_bit_flip_is_a_clean_error() {
    let image = encode_state(&sample_state()).unwrap();
    for bit in 0..image.len() * 8 {
        let mut corrupt = image.clone();
        corrupt[bit / 8] ^= 1 << (bit % 8);
        let result = std::panic::catch_unwind(|| decode_state::<TestState>(&corrupt));
        match result {
            Ok(Err(_)) => {}
            Ok(Ok(_)) => panic!("bit flip {bit} was accepted"),
            Err(_) => panic!("bit flip {bit} panicked"),
        }
    }
}

#[test]
fn every_truncation_and_extension_is_a_clean_error() {
    let image = encode_state(&sample_state()).unwrap();
    for len in 0..image.len() {
        assert!(
            decode_state::<TestState>(&image[..len]).is_err(),
            "truncated to {len}"
        );
    }
    let mut longer = image.clone();
    longer.push(0);
    assert!(matches!(
        decode_state::<TestState>(&longer),
        Err(SnapshotError::Truncated { .. })
    ));
}

#[test]
fn corrupted_length_fields_never_allocate_or_panic() {
    let image = encode_state(&sample_state()).unwrap();
    let lengths = [
        0u64,
        1,
        31,
        32,
        1 << 20,
        1 << 31,
        1 << 40,
        u64::MAX / 2,
        u64::MAX - 31,
        u64::MAX,
    ];
    for &len in &lengths {
        for reseal in [false, true] {
            let mut corrupt = image.clone();
            corrupt[16..24].copy_from_slice(&len.to_le_bytes());
            if reseal {
                let crc = crc32fast::hash(&corrupt[..28]);
                corrupt[28..32].copy_from_slice(&crc.to_le_bytes());
            }
            assert!(
                decode_state::<TestState>(&corrupt).is_err(),
                "length {len} reseal {reseal}"
            );
        }
    }
}

#[test]
fn well_sealed_garbage_payloads_are_decode_errors() {
    // A valid header and CRC around a payload that is not a TestState: the serde layer must
    // refuse it, including lengths inside the payload that claim huge collections.
    for payload in [vec![], vec![0xff; 64], vec![0x80; 16], {
        let mut p = vec![0xff, 0xff, 0xff, 0xff, 0x0f];
        p.extend_from_slice(&[1; 40]);
        p
    }] {
        let mut image = Vec::new();
        image.extend_from_slice(b"DMSTATE\0");
        image.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        image.extend_from_slice(&0u32.to_le_bytes());
        image.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        image.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        let crc = crc32fast::hash(&image);
        image.extend_from_slice(&crc.to_le_bytes());
        image.extend_from_slice(&payload);
        assert!(matches!(
            decode_state::<TestState>(&image),
            Err(SnapshotError::Decode { .. })
        ));
    }
}

#[test]
fn trailing_payload_bytes_are_refused() {
    let state = sample_state();
    let image = encode_state(&state).unwrap();
    let mut payload = image[32..].to_vec();
    payload.push(7);
    let mut resealed = image[..32].to_vec();
    resealed[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    resealed[24..28].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let crc = crc32fast::hash(&resealed[..28]);
    resealed[28..32].copy_from_slice(&crc.to_le_bytes());
    resealed.extend_from_slice(&payload);
    assert!(matches!(
        decode_state::<TestState>(&resealed),
        Err(SnapshotError::Decode { .. })
    ));
}

#[test]
fn huge_state_file_is_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let file = fs::File::create(dir.path().join(STATE_FILE)).unwrap();
    file.set_len(1 << 40).unwrap(); // sparse: costs no disk
    assert!(matches!(
        read_state::<TestState>(dir.path()),
        Err(SnapshotError::TooLarge { .. })
    ));
}

#[test]
fn missing_state_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_state::<TestState>(dir.path()).unwrap_err();
    assert!(err.to_string().contains(STATE_FILE), "{err}");
}
