//! `manifest.json` round trips, validation and robustness against damage.

mod common;

use std::path::Path;

use common::meta;
use snapshot::{
    check_compatible, compute_layout, HostFacts, Manifest, PageCounts, ParentRef, SnapshotError,
    SnapshotId, SnapshotKind, FORMAT_VERSION, MANIFEST_FILE,
};

fn sample_manifest() -> Manifest {
    let regions = compute_layout(&[(0, 0x8000_0000), (0x1_0000_0000, 0x4000_0000)]).unwrap();
    let total = (0x8000_0000u64 + 0x4000_0000) / 4096;
    Manifest::new(
        SnapshotKind::Full,
        None,
        &meta(),
        regions,
        PageCounts {
            total,
            written: 10_000,
            dirty: 10_000,
        },
    )
    .unwrap()
}

#[test]
fn manifest_round_trips_and_is_readable_json() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = sample_manifest();
    manifest.write(dir.path()).unwrap();
    let back = Manifest::read(dir.path()).unwrap();
    assert_eq!(back, manifest);
    let text = std::fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap();
    let version = format!("\"format_version\": {FORMAT_VERSION}");
    for needle in [
        version.as_str(),
        "\"kind\": \"full\"",
        "\"memory_size\": 3221225472",
        "kvm-pvm",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    assert_eq!(manifest.memory_size, 0xC000_0000);
}

#[test]
fn inconsistent_manifests_are_refused() {
    let path = Path::new(MANIFEST_FILE);
    let base = sample_manifest();
    type Mutation = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "future version",
            Box::new(|m| m.format_version = FORMAT_VERSION + 1),
        ),
        (
            "older than readable",
            Box::new(|m| m.format_version = snapshot::OLDEST_READABLE_FORMAT - 1),
        ),
        ("size mismatch", Box::new(|m| m.memory_size += 4096)),
        (
            "region gap in file",
            Box::new(|m| m.regions[1].file_offset += 4096),
        ),
        ("unaligned region", Box::new(|m| m.regions[0].size -= 1)),
        (
            "overlapping regions",
            Box::new(|m| m.regions[1].guest_addr = 0x1000),
        ),
        ("no regions", Box::new(|m| m.regions.clear())),
        ("too many written", Box::new(|m| m.pages.written = u64::MAX)),
        (
            "full with parent",
            Box::new(|m| {
                m.parent = Some(ParentRef {
                    dir: "../base".into(),
                    id: SnapshotId::random().unwrap(),
                })
            }),
        ),
        (
            "diff without parent",
            Box::new(|m| m.kind = SnapshotKind::Diff),
        ),
        (
            "huge memory",
            Box::new(|m| {
                m.regions = compute_layout(&[(0, 1 << 50)]).unwrap();
                m.memory_size = 1 << 50;
                m.pages.total = (1 << 50) / 4096;
            }),
        ),
    ];
    for (name, mutate) in cases {
        let mut manifest = base.clone();
        mutate(&mut manifest);
        let json = manifest.to_json().unwrap();
        let result = Manifest::from_json(&json, path);
        assert!(
            matches!(result, Err(SnapshotError::InvalidManifest { .. })),
            "{name}: {result:?}"
        );
    }
    let bad_id = String::from_utf8(base.to_json().unwrap())
        .unwrap()
        .replace(base.snapshot_id.as_str(), "not-an-id");
    assert!(Manifest::from_json(bad_id.as_bytes(), path).is_err());
}

#[test]
fn mutated_manifest_json_never_panics_and_accepted_ones_are_valid() {
    let json = sample_manifest().to_json().unwrap();
    let path = Path::new(MANIFEST_FILE);
    let mut rejected = 0usize;
    let mut total = 0usize;
    let mut check = |bytes: &[u8]| {
        total += 1;
        match std::panic::catch_unwind(|| Manifest::from_json(bytes, path)) {
            Err(_) => panic!(
                "manifest reader panicked on {:?}",
                String::from_utf8_lossy(bytes)
            ),
            Ok(Err(_)) => rejected += 1,
            // Some edits yield another valid manifest (e.g. a digit in a timestamp).
            Ok(Ok(manifest)) => assert!(manifest.validate().is_ok()),
        }
    };
    for bit in 0..json.len() * 8 {
        let mut corrupt = json.clone();
        corrupt[bit / 8] ^= 1 << (bit % 8);
        check(&corrupt);
    }
    for len in 0..json.len() {
        check(&json[..len]);
    }
    // Number fields replaced with extremes.
    let text = String::from_utf8(json.clone()).unwrap();
    for huge in [
        "18446744073709551615",
        "18446744073709551616",
        "-1",
        "1e400",
        "0",
    ] {
        for field in [
            "\"memory_size\": ",
            "\"size\": ",
            "\"file_offset\": ",
            "\"total\": ",
        ] {
            if let Some(at) = text.find(field) {
                let start = at + field.len();
                let end = start + text[start..].find([',', '\n']).unwrap();
                let edited = format!("{}{}{}", &text[..start], huge, &text[end..]);
                check(edited.as_bytes());
            }
        }
    }
    assert!(
        rejected * 10 > total * 8,
        "only {rejected} of {total} mutations rejected"
    );
}

#[test]
fn oversized_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join(MANIFEST_FILE)).unwrap();
    file.set_len(64 << 20).unwrap();
    assert!(matches!(
        Manifest::read(dir.path()),
        Err(SnapshotError::TooLarge { .. })
    ));
}

#[test]
fn compatibility_checks_list_every_problem() {
    let manifest = sample_manifest();
    let same = manifest.host.clone();
    check_compatible(&manifest, &same).unwrap();

    let mut richer = same.clone();
    richer.cpu_features.push("avx512f".into());
    check_compatible(&manifest, &richer).unwrap();

    let other = HostFacts {
        kind: "kvm-vmx".into(),
        paging_levels: 5,
        cpu_features: vec!["sse4.2".into()],
    };
    match check_compatible(&manifest, &other) {
        Err(SnapshotError::Incompatible { reasons }) => {
            assert_eq!(reasons.len(), 3, "{reasons:?}");
            assert!(reasons[2].contains("avx2"));
        }
        other => panic!("expected incompatibility, got {other:?}"),
    }
}
