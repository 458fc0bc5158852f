//! Diff snapshots: chains, restore through them, merging, and refusal of broken chains.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use snapshot::{
    load_snapshot, load_snapshot_reusing, merge_chain, open_snapshot_reusing, read_bitmap,
    resolve_chain, restore_memory, write_snapshot, DecodedState, Manifest, MemoryRegion,
    MemorySource, PageBitmap, PageSelection, RestoreStrategy, SnapshotError, SnapshotKind,
    WriteOptions, BITMAP_FILE, MEMORY_FILE, PAGE_SIZE, STATE_FILE,
};
use vm_memory::GuestMemoryMmap;

const HIGH: u64 = 0x1_0000_0000;

struct Chain {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    diff1: PathBuf,
    diff2: PathBuf,
    layout: Vec<MemoryRegion>,
    /// Guest memory contents at each snapshot.
    at_base: Vec<u8>,
    at_diff1: Vec<u8>,
    at_diff2: Vec<u8>,
}

fn snapshot_to(
    dir: &Path,
    memory: &GuestMemoryMmap<()>,
    dirty: &[PageBitmap],
    parent: Option<&Path>,
    generation: u32,
) {
    let source = MemorySource::from_guest_memory(memory).unwrap();
    let mut state = sample_state();
    state.vcpus[0].id = generation;
    write_snapshot(
        dir,
        &state,
        &source,
        PageSelection::Dirty(dirty),
        &meta(),
        &WriteOptions {
            parent,
            sync: false,
            // Some tests put a different snapshot where one was.
            replace: true,
            ..WriteOptions::default()
        },
    )
    .unwrap();
}

/// base: scattered pages; diff1: a large run (mapped on private restore), single pages, and a
/// page zeroed again; diff2: overlaps diff1 and base, and touches the second region.
fn build_chain() -> Chain {
    let tmp = tempfile::tempdir().unwrap();
    let (base, diff1, diff2) = (
        tmp.path().join("base"),
        tmp.path().join("diff1"),
        tmp.path().join("diff2"),
    );
    let memory = guest_memory(4 << 20, 1 << 20);
    let layout = MemorySource::from_guest_memory(&memory)
        .unwrap()
        .layout()
        .to_vec();

    let mut dirty = empty_dirty(&layout);
    for page in (0..1024).step_by(3) {
        touch_page(&memory, &mut dirty, 0, 0, page, 1);
    }
    for page in 0..256 {
        touch_page(&memory, &mut dirty, 1, HIGH, page, 1);
    }
    snapshot_to(&base, &memory, &dirty, None, 0);
    let at_base = dump(&memory, &layout);

    let mut dirty = empty_dirty(&layout);
    for page in 100..400 {
        touch_page(&memory, &mut dirty, 0, 0, page, 2);
    }
    for page in [0u64, 5, 1023] {
        touch_page(&memory, &mut dirty, 0, 0, page, 2);
    }
    zero_page(&memory, &mut dirty, 0, 0, 3); // non-zero in base, zero now
    snapshot_to(&diff1, &memory, &dirty, Some(&base), 1);
    let at_diff1 = dump(&memory, &layout);

    let mut dirty = empty_dirty(&layout);
    for page in 350..360 {
        touch_page(&memory, &mut dirty, 0, 0, page, 3);
    }
    touch_page(&memory, &mut dirty, 0, 0, 6, 3);
    for page in 200..256 {
        touch_page(&memory, &mut dirty, 1, HIGH, page, 3);
    }
    snapshot_to(&diff2, &memory, &dirty, Some(&diff1), 2);
    let at_diff2 = dump(&memory, &layout);

    Chain {
        _tmp: tmp,
        base,
        diff1,
        diff2,
        layout,
        at_base,
        at_diff1,
        at_diff2,
    }
}

#[test]
fn diffs_store_only_dirty_pages_and_link_to_their_parent() {
    let chain = build_chain();
    let base = Manifest::read(&chain.base).unwrap();
    let diff1 = Manifest::read(&chain.diff1).unwrap();
    assert_eq!(diff1.kind, SnapshotKind::Diff);
    let parent = diff1.parent.as_ref().unwrap();
    assert_eq!(parent.id, base.snapshot_id);
    assert_eq!(
        parent.dir,
        Path::new("../base"),
        "siblings are linked relatively"
    );
    assert_eq!(diff1.pages.written, 300 + 3 + 1);
    let bitmap = read_bitmap(&chain.diff1, diff1.page_count()).unwrap();
    assert_eq!(bitmap.count_ones(), 304);
    assert!(bitmap.get(3) && bitmap.get(100) && !bitmap.get(99));
    assert!(!chain.base.join(BITMAP_FILE).exists());
    assert!(allocated_bytes(&chain.diff1.join(MEMORY_FILE)) < 400 * PAGE_SIZE);

    let layers = resolve_chain(&chain.diff2).unwrap();
    assert_eq!(layers.len(), 3);
    assert_eq!(layers[2].manifest.snapshot_id, base.snapshot_id);
}

#[test]
fn restoring_a_chain_gives_the_newest_contents() {
    let chain = build_chain();
    for strategy in [RestoreStrategy::Private, RestoreStrategy::Copy] {
        for (dir, expected, generation) in [
            (&chain.base, &chain.at_base, 0),
            (&chain.diff1, &chain.at_diff1, 1),
            (&chain.diff2, &chain.at_diff2, 2),
        ] {
            let loaded = load_snapshot::<TestState>(dir, strategy).unwrap();
            assert_eq!(
                loaded.state.vcpus[0].id, generation,
                "state comes from the newest layer"
            );
            let restored = dump_restored(&loaded.memory, &chain.layout);
            assert!(&restored == expected, "{strategy:?} {}", dir.display());
        }
    }
}

/// Unmapped host ranges laid out as `layout` (as a VM shell's reserved RAM is), far from where
/// the kernel places other mappings, and guest memory over them that owns nothing; with the
/// ranges, to unmap at the end.
fn memory_over_holes(layout: &[MemoryRegion]) -> (snapshot::GuestMemory, Vec<(usize, usize)>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
    use vm_memory::mmap::MmapRegionBuilder;
    static NEXT: AtomicUsize = AtomicUsize::new(0x2800_0000_0000);
    let mut regions = Vec::new();
    let mut ranges = Vec::new();
    for region in layout {
        let len = region.size as usize;
        let host = NEXT.fetch_add(len.next_multiple_of(1 << 30), Ordering::Relaxed);
        assert!(is_unmapped(host, len), "the test's range is free");
        // SAFETY: the range is reserved for this test; nothing reads it before it is mapped.
        let mapping = unsafe {
            MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
                .with_raw_mmap_pointer(host as *mut u8)
        }
        .build()
        .unwrap();
        regions.push(
            vm_memory::GuestRegionMmap::new(mapping, vm_memory::GuestAddress(region.guest_addr))
                .unwrap(),
        );
        ranges.push((host, len));
    }
    (GuestMemoryMmap::from_regions(regions).unwrap(), ranges)
}

/// Whether nothing maps `[host, host + len)`: a `PROT_NONE` probe with `MAP_FIXED_NOREPLACE`
/// (which fails where anything is mapped), unmapped right away.
fn is_unmapped(host: usize, len: usize) -> bool {
    // SAFETY: NOREPLACE maps only where nothing is; the probe is unmapped right away.
    let probe = unsafe {
        libc::mmap(
            host as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE
                | libc::MAP_ANONYMOUS
                | libc::MAP_NORESERVE
                | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if probe == libc::MAP_FAILED {
        return false;
    }
    // SAFETY: the probe mapping just made.
    unsafe { libc::munmap(probe, len) };
    probe as usize == host
}

/// What a warm VM shell restore does: the chain mapped into the unmapped host ranges the
/// shell's memory slots point at (the addresses unchanged), with the same contents as a
/// private restore.
#[test]
fn a_chain_mapped_into_reserved_holes_gives_the_newest_contents_in_place() {
    use vm_memory::GuestMemoryBackend;
    let chain = build_chain();
    for (dir, expected) in [
        (&chain.base, &chain.at_base),
        (&chain.diff2, &chain.at_diff2),
    ] {
        let (target, ranges) = memory_over_holes(&chain.layout);
        let hosts: Vec<*mut u8> = target.iter().map(|r| r.as_ptr()).collect();
        let opened = snapshot::open_snapshot::<TestState>(dir).unwrap();
        assert_eq!(opened.layout(), chain.layout.as_slice());
        let mut mapped = Vec::new();
        let loaded = opened
            .map_into_holes(&target, &mut |index| mapped.push(index))
            .unwrap();
        assert_eq!(mapped, (0..chain.layout.len()).collect::<Vec<_>>());
        let after: Vec<*mut u8> = loaded.memory.iter().map(|r| r.as_ptr()).collect();
        assert_eq!(hosts, after, "the same host addresses");
        assert!(
            &dump_restored(&target, &chain.layout) == expected,
            "{}",
            dir.display()
        );
        drop((loaded, target));
        for (host, len) in ranges {
            // SAFETY: the test's own mappings, no longer used.
            unsafe { libc::munmap(host as *mut libc::c_void, len) };
        }
    }
    // Memory of another layout is refused before anything is mapped.
    let (other, ranges) = memory_over_holes(&chain.layout[..1]);
    let opened = snapshot::open_snapshot::<TestState>(&chain.base).unwrap();
    let mut mapped = 0;
    assert!(matches!(
        opened.map_into_holes(&other, &mut |_| mapped += 1),
        Err(SnapshotError::InvalidMemory(_))
    ));
    assert_eq!(mapped, 0);
    assert!(ranges.iter().all(|&(host, len)| is_unmapped(host, len)));

    // A range someone else mapped meanwhile is refused, and left as it was.
    let (taken, ranges) = memory_over_holes(&chain.layout);
    let (host, _) = ranges[0];
    // SAFETY: maps one page into the test's own free range.
    let intruder = unsafe {
        libc::mmap(
            host as *mut libc::c_void,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(intruder as usize, host);
    // SAFETY: the page just mapped.
    unsafe { (host as *mut u8).write(0x5a) };
    let opened = snapshot::open_snapshot::<TestState>(&chain.base).unwrap();
    let mut mapped = 0;
    assert!(opened.map_into_holes(&taken, &mut |_| mapped += 1).is_err());
    assert_eq!(mapped, 0);
    // SAFETY: still the intruder's page.
    assert_eq!(unsafe { (host as *mut u8).read() }, 0x5a);
    // SAFETY: the test's own page.
    unsafe { libc::munmap(intruder, 4096) };
}

#[test]
fn merged_chain_equals_the_chain_and_is_standalone() {
    let chain = build_chain();
    let merged = chain.diff2.parent().unwrap().join("merged");
    let manifest = merge_chain(&chain.diff2, &merged, false).unwrap();
    assert_eq!(manifest.kind, SnapshotKind::Full);
    assert!(manifest.parent.is_none());
    assert!(!merged.join(BITMAP_FILE).exists());

    // The merged snapshot no longer needs the chain.
    fs::remove_dir_all(&chain.base).unwrap();
    fs::remove_dir_all(&chain.diff1).unwrap();
    for strategy in [RestoreStrategy::Private, RestoreStrategy::Copy] {
        let loaded = load_snapshot::<TestState>(&merged, strategy).unwrap();
        assert_eq!(loaded.state.vcpus[0].id, 2);
        assert!(dump_restored(&loaded.memory, &chain.layout) == chain.at_diff2);
    }
    // Sparse: roughly the pages that were ever non-zero.
    assert!(allocated_bytes(&merged.join(MEMORY_FILE)) < 1200 * PAGE_SIZE);
}

#[test]
fn merging_in_place_turns_a_diff_into_a_full_snapshot() {
    let chain = build_chain();
    merge_chain(&chain.diff1, &chain.diff1, true).unwrap();
    let manifest = Manifest::read(&chain.diff1).unwrap();
    assert_eq!(manifest.kind, SnapshotKind::Full);
    fs::remove_dir_all(&chain.base).unwrap();
    let restored = restore_memory(&chain.diff1, RestoreStrategy::Private).unwrap();
    assert!(dump_restored(&restored, &chain.layout) == chain.at_diff1);
    // diff2 pointed at the old diff1, which has a new identity now.
    assert!(matches!(
        resolve_chain(&chain.diff2),
        Err(SnapshotError::ParentMismatch { .. })
    ));
}

#[test]
fn missing_parent_is_refused() {
    let chain = build_chain();
    fs::remove_dir_all(&chain.base).unwrap();
    for strategy in [RestoreStrategy::Private, RestoreStrategy::Copy] {
        assert!(matches!(
            restore_memory(&chain.diff2, strategy),
            Err(SnapshotError::MissingParent { .. })
        ));
    }
    assert!(matches!(
        merge_chain(&chain.diff2, &chain.diff2.with_file_name("out"), false),
        Err(SnapshotError::MissingParent { .. })
    ));
}

#[test]
fn replaced_parent_is_refused() {
    let chain = build_chain();
    // A different snapshot now lives where the parent was.
    let memory = guest_memory(4 << 20, 1 << 20);
    let dirty = empty_dirty(&chain.layout);
    snapshot_to(&chain.diff1, &memory, &dirty, None, 9);
    assert!(matches!(
        restore_memory(&chain.diff2, RestoreStrategy::Private),
        Err(SnapshotError::ParentMismatch { .. })
    ));
}

#[test]
fn parent_with_another_layout_is_refused() {
    let chain = build_chain();
    let memory = guest_memory(2 << 20, 1 << 20);
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let dirty = empty_dirty(source.layout());
    let result = write_snapshot(
        &chain.base.with_file_name("other"),
        &sample_state(),
        &source,
        PageSelection::Dirty(&dirty),
        &meta(),
        &WriteOptions {
            parent: Some(&chain.base),
            sync: false,
            ..WriteOptions::default()
        },
    );
    assert!(matches!(result, Err(SnapshotError::LayoutMismatch { .. })));
}

#[test]
fn diff_needs_dirty_pages_and_cannot_replace_its_parent() {
    let chain = build_chain();
    let memory = guest_memory(4 << 20, 1 << 20);
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let dirty = empty_dirty(source.layout());
    let nonzero = write_snapshot(
        &chain.base.with_file_name("d"),
        &sample_state(),
        &source,
        PageSelection::NonZero,
        &meta(),
        &WriteOptions {
            parent: Some(&chain.base),
            sync: false,
            ..WriteOptions::default()
        },
    );
    assert!(matches!(nonzero, Err(SnapshotError::InvalidRequest(_))));
    let onto_parent = write_snapshot(
        &chain.base,
        &sample_state(),
        &source,
        PageSelection::Dirty(&dirty),
        &meta(),
        &WriteOptions {
            parent: Some(&chain.base),
            sync: false,
            ..WriteOptions::default()
        },
    );
    assert!(matches!(onto_parent, Err(SnapshotError::InvalidRequest(_))));
    assert!(
        restore_memory(&chain.diff2, RestoreStrategy::Private).is_ok(),
        "chain untouched"
    );
}

#[test]
fn cycles_are_refused() {
    let chain = build_chain();
    // Turn the base into a diff whose parent is diff2: diff2 -> diff1 -> base -> diff2.
    let diff2 = Manifest::read(&chain.diff2).unwrap();
    let mut base = Manifest::read(&chain.base).unwrap();
    base.kind = SnapshotKind::Diff;
    base.parent = Some(snapshot::ParentRef {
        dir: "../diff2".into(),
        id: diff2.snapshot_id.clone(),
    });
    base.write(&chain.base).unwrap();
    fs::write(
        chain.base.join(BITMAP_FILE),
        PageBitmap::new(base.page_count()).encode(),
    )
    .unwrap();
    assert!(matches!(
        restore_memory(&chain.diff2, RestoreStrategy::Private),
        Err(SnapshotError::ChainCycle { .. })
    ));

    // A self-referencing snapshot is a cycle too.
    let mut selfish = Manifest::read(&chain.diff1).unwrap();
    selfish.parent = Some(snapshot::ParentRef {
        dir: ".".into(),
        id: selfish.snapshot_id.clone(),
    });
    selfish.write(&chain.diff1).unwrap();
    assert!(matches!(
        resolve_chain(&chain.diff1),
        Err(SnapshotError::ChainCycle { .. })
    ));
}

#[test]
fn damaged_diff_files_are_refused() {
    let chain = build_chain();
    let bitmap_path = chain.diff1.join(BITMAP_FILE);
    let original = fs::read(&bitmap_path).unwrap();

    let mut flipped = original.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    fs::write(&bitmap_path, &flipped).unwrap();
    assert!(matches!(
        restore_memory(&chain.diff2, RestoreStrategy::Private),
        Err(SnapshotError::MissingParent { source, .. }) if matches!(*source, SnapshotError::PayloadChecksum { .. })
    ));

    fs::write(&bitmap_path, &original[..original.len() - 8]).unwrap();
    assert!(restore_memory(&chain.diff1, RestoreStrategy::Copy).is_err());
    fs::remove_file(&bitmap_path).unwrap();
    assert!(restore_memory(&chain.diff1, RestoreStrategy::Copy).is_err());
    fs::write(&bitmap_path, &original).unwrap();
    restore_memory(&chain.diff1, RestoreStrategy::Copy).unwrap();

    let memory = fs::OpenOptions::new()
        .write(true)
        .open(chain.diff1.join(MEMORY_FILE))
        .unwrap();
    memory.set_len(PAGE_SIZE).unwrap();
    assert!(matches!(
        restore_memory(&chain.diff1, RestoreStrategy::Private),
        Err(SnapshotError::MemoryFileTooSmall { .. })
    ));
}

/// A state decoded once opens the same snapshot again without `state.bin` being read (its
/// bytes are spoiled here, and the reusing open still works), and never stands in for another
/// snapshot written to the same directory since.
#[test]
fn a_decoded_state_is_reused_only_for_the_snapshot_it_came_from() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("template");
    let memory = guest_memory(4 << 20, 1 << 20);
    let layout = MemorySource::from_guest_memory(&memory)
        .unwrap()
        .layout()
        .to_vec();
    let mut dirty = empty_dirty(&layout);
    touch_page(&memory, &mut dirty, 0, 0, 7, 1);
    snapshot_to(&dir, &memory, &dirty, None, 11);
    let known = DecodedState::<TestState>::read(&dir).unwrap();
    assert_eq!(known.state().vcpus[0].id, 11);

    let state_file = dir.join(STATE_FILE);
    let good = fs::read(&state_file).unwrap();
    fs::write(&state_file, b"not a state").unwrap();
    assert!(snapshot::open_snapshot::<TestState>(&dir).is_err());
    let opened = open_snapshot_reusing(&dir, Some(&known)).unwrap();
    assert_eq!(&opened.state, known.state());
    let loaded = load_snapshot_reusing(&dir, RestoreStrategy::Private, Some(&known)).unwrap();
    assert_eq!(&loaded.state, known.state());
    assert_eq!(
        dump_restored(&loaded.memory, &layout),
        dump(&memory, &layout)
    );
    fs::write(&state_file, good).unwrap();

    // Another snapshot in its place: its own state is read.
    snapshot_to(&dir, &memory, &dirty, None, 12);
    let opened = open_snapshot_reusing(&dir, Some(&known)).unwrap();
    assert_eq!(opened.state.vcpus[0].id, 12);
    let loaded = load_snapshot_reusing(&dir, RestoreStrategy::Private, Some(&known)).unwrap();
    assert_eq!(loaded.state.vcpus[0].id, 12);
    assert_ne!(
        Manifest::read(&dir).unwrap().snapshot_id,
        *known.snapshot_id()
    );
    // Without a known state, as `open_snapshot`.
    let opened = open_snapshot_reusing::<TestState>(&dir, None).unwrap();
    assert_eq!(opened.state.vcpus[0].id, 12);
}
