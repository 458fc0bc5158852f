//! Live snapshots: memory keeps changing while it is written, and the memory file still holds
//! exactly the contents at the start. Needs userfaultfd write-protect (root, Linux ≥ 5.7); with
//! `CI` set its absence fails the test.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use common::*;
use snapshot::{
    load_snapshot, prepare_live_snapshot, LiveOptions, MemorySource, PageBitmap, RestoreStrategy,
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

/// Pages holding data per region, as the VMM's residency check would say (`mincore`).
fn resident(memory: &GuestMemoryMmap<()>) -> Vec<PageBitmap> {
    memory
        .iter()
        .map(|region| {
            let len = vm_memory::GuestMemoryRegion::len(region) as usize;
            let pages = len / PAGE_SIZE as usize;
            let mut vec = vec![0u8; pages];
            // SAFETY: the region is a live mapping of `len` bytes; `vec` has a byte per page.
            let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr()) };
            assert_eq!(rc, 0);
            let mut bitmap = PageBitmap::new(pages as u64);
            for (page, &flags) in vec.iter().enumerate() {
                if flags & 1 != 0 {
                    bitmap.set_range(page as u64, 1);
                }
            }
            bitmap
        })
        .collect()
}

fn snapshot_of(memory: &GuestMemoryMmap<()>, total: u64, low_pages: u64) -> Vec<Vec<u8>> {
    (0..total)
        .map(|page| {
            let mut bytes = vec![0u8; PAGE_SIZE as usize];
            memory
                .read_slice(&mut bytes, addr_of(page, low_pages))
                .unwrap();
            bytes
        })
        .collect()
}

#[test]
fn memory_written_during_a_live_snapshot_is_saved_as_it_was_at_the_pause() {
    if !write_protect_available() {
        return;
    }
    // 48 MiB in two regions; pages 0..64 of the low region untouched at first.
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
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let prepared =
        prepare_live_snapshot(&snap, &source, &resident(&memory), options(&memory)).unwrap();

    // Before the pause the guest still runs: it rewrites some pages, touches a new one, and a
    // range is discarded and written again (it comes back unprotected).
    for page in 100..200 {
        memory
            .write_slice(&page_pattern(page, 3), addr_of(page, low_pages))
            .unwrap();
    }
    memory
        .write_slice(&page_pattern(10, 3), addr_of(10, low_pages))
        .unwrap();
    // The last page of the low region and the first of the high one: adjacent in the memory
    // file, not in the host's address space (a run to protect again must be split).
    for page in [low_pages - 1, low_pages] {
        memory
            .write_slice(&page_pattern(page, 3), addr_of(page, low_pages))
            .unwrap();
    }
    let discarded = memory.get_host_address(addr_of(300, low_pages)).unwrap();
    // SAFETY: 10 pages inside the low region, which this test owns.
    assert_eq!(
        unsafe {
            libc::madvise(
                discarded.cast(),
                10 * PAGE_SIZE as usize,
                libc::MADV_DONTNEED,
            )
        },
        0
    );
    for page in 300..305 {
        memory
            .write_slice(&page_pattern(page, 3), addr_of(page, low_pages))
            .unwrap();
    }

    // The pause: this is what the snapshot must hold.
    // (Residency first: reading a page maps the zero page, which counts as resident.)
    let resident_now = resident(&memory);
    let expected = snapshot_of(&memory, total, low_pages);
    let live = prepared
        .start(sample_state(), &resident_now, &meta())
        .unwrap();
    // The guest runs again: it rewrites every page, from the end backwards (against the
    // writer's direction, so that many writes land before the writer gets there).
    let mutator = {
        let memory = memory.clone();
        std::thread::spawn(move || {
            for page in (0..total).rev() {
                memory
                    .write_slice(&page_pattern(page, 2), addr_of(page, low_pages))
                    .unwrap();
            }
        })
    };
    let (manifest, stats) = live.finish().unwrap();
    mutator.join().unwrap();
    eprintln!("{stats:?}");
    // 64..total minus the 5 discarded pages not written again, plus page 10.
    assert_eq!(manifest.pages.written, total - 64 - 5 + 1);
    assert!(stats.pages_reprotected >= 100 + 1 + 5, "{stats:?}");

    let file = std::fs::File::open(snap.join(MEMORY_FILE)).unwrap();
    let mut page_bytes = vec![0u8; PAGE_SIZE as usize];
    for page in 0..total {
        file.read_exact_at(&mut page_bytes, page * PAGE_SIZE)
            .unwrap();
        assert!(
            page_bytes == expected[page as usize],
            "memory-file page {page}"
        );
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
        .read_slice(&mut first, addr_of(150, low_pages))
        .unwrap();
    assert!(first == page_pattern(150, 3));
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
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    // Dropped before the pause, and dropped after it.
    let prepared =
        prepare_live_snapshot(&snap, &source, &resident(&memory), options(&memory)).unwrap();
    drop(prepared);
    memory
        .write_slice(&page_pattern(3, 2), GuestAddress(3 * PAGE_SIZE))
        .unwrap();
    let prepared =
        prepare_live_snapshot(&snap, &source, &resident(&memory), options(&memory)).unwrap();
    let live = prepared
        .start(sample_state(), &resident(&memory), &meta())
        .unwrap();
    drop(live);
    // Writable again (a protected page would block this thread forever) and nothing left.
    memory
        .write_slice(&page_pattern(3, 4), GuestAddress(3 * PAGE_SIZE))
        .unwrap();
    assert!(!snap.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
