//! Live snapshots: memory keeps changing while it is written, and the memory file still holds
//! exactly the contents at the start. Needs userfaultfd write-protect (root, Linux ≥ 5.7); with
//! `CI` set its absence fails the test.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use snapshot::{
    load_snapshot, start_live_snapshot, LiveOptions, MemorySource, PageBitmap, RestoreStrategy,
    MEMORY_FILE, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const HIGH: u64 = 0x1_0000_0000;

fn write_protect_available() -> bool {
    match snapshot::Userfaultfd::new() {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "userfaultfd is unavailable ({e}); CI runs as root and needs it"
            );
            eprintln!("skipping: userfaultfd unavailable: {e}");
            false
        }
    }
}

fn options(memory: &GuestMemoryMmap<()>) -> LiveOptions {
    LiveOptions {
        on_thread_start: Arc::new(|| {}),
        keep_alive: Box::new(memory.clone()),
        replace: false,
        companions: None,
        sync: false,
    }
}

fn addr_of(page: u64, low_pages: u64) -> GuestAddress {
    if page < low_pages {
        GuestAddress(page * PAGE_SIZE)
    } else {
        GuestAddress(HIGH + (page - low_pages) * PAGE_SIZE)
    }
}

#[test]
fn memory_written_during_a_live_snapshot_is_saved_as_it_was() {
    if !write_protect_available() {
        return;
    }
    // 48 MiB in two regions; pages 0..64 of the low region never touched before the snapshot.
    let (low, high) = (32usize << 20, 16usize << 20);
    let low_pages = low as u64 / PAGE_SIZE;
    let total = (low + high) as u64 / PAGE_SIZE;
    let memory = guest_memory(low, high);
    for page in 64..total {
        memory
            .write_slice(&page_pattern(page, 1), addr_of(page, low_pages))
            .unwrap();
    }
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let mut selection = vec![
        PageBitmap::new(low_pages),
        PageBitmap::new(high as u64 / PAGE_SIZE),
    ];
    selection[0].set_range(64, low_pages - 64);
    selection[1].set_range(0, high as u64 / PAGE_SIZE);

    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let live = start_live_snapshot(
        &snap,
        sample_state(),
        &source,
        &selection,
        &meta(),
        options(&memory),
    )
    .unwrap();
    // "The guest runs": it rewrites every page, from the end backwards (against the writer's
    // direction, so that many writes land before the writer gets there), and the untouched
    // pages too.
    let done = Arc::new(AtomicBool::new(false));
    let mutator = {
        let memory = memory.clone();
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            for page in (0..total).rev() {
                memory
                    .write_slice(&page_pattern(page, 2), addr_of(page, low_pages))
                    .unwrap();
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let (manifest, stats) = live.finish().unwrap();
    mutator.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    assert_eq!(manifest.pages.written, total - 64);
    assert_eq!(stats.pages_written, total - 64);
    eprintln!("{stats:?}");

    // The file holds generation 1 everywhere (holes for the untouched pages), memory holds 2.
    let file = std::fs::File::open(snap.join(MEMORY_FILE)).unwrap();
    let mut page_bytes = vec![0u8; PAGE_SIZE as usize];
    for page in 0..total {
        file.read_exact_at(&mut page_bytes, page * PAGE_SIZE)
            .unwrap();
        let expected = if page < 64 {
            vec![0u8; PAGE_SIZE as usize]
        } else {
            page_pattern(page, 1)
        };
        assert!(page_bytes == expected, "memory-file page {page}");
        memory
            .read_slice(&mut page_bytes, addr_of(page, low_pages))
            .unwrap();
        assert!(page_bytes == page_pattern(page, 2), "guest page {page}");
    }
    // And it loads like any snapshot.
    let loaded = load_snapshot::<TestState>(&snap, RestoreStrategy::Private).unwrap();
    assert_eq!(loaded.state, sample_state());
    let mut first = vec![0u8; PAGE_SIZE as usize];
    loaded
        .memory
        .read_slice(&mut first, addr_of(100, low_pages))
        .unwrap();
    assert!(first == page_pattern(100, 1));
}

#[test]
fn an_abandoned_live_snapshot_lifts_the_protection_and_installs_nothing() {
    if !write_protect_available() {
        return;
    }
    let memory = guest_memory(8 << 20, 0x1000);
    memory
        .write_slice(&page_pattern(3, 1), GuestAddress(3 * PAGE_SIZE))
        .unwrap();
    let source = MemorySource::from_guest_memory(&memory).unwrap();
    let selection: Vec<PageBitmap> = memory
        .iter()
        .map(|r| PageBitmap::full(vm_memory::GuestMemoryRegion::len(r) / PAGE_SIZE))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let live = start_live_snapshot(
        &snap,
        sample_state(),
        &source,
        &selection,
        &meta(),
        options(&memory),
    )
    .unwrap();
    drop(live);
    // Writable again (a protected page would block this thread forever) and nothing left.
    memory
        .write_slice(&page_pattern(3, 2), GuestAddress(3 * PAGE_SIZE))
        .unwrap();
    assert!(!snap.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
