//! Lazy restore through userfaultfd: pages arrive on first touch, the rest by streaming, and a
//! chunk that cannot be served never yields wrong bytes. Needs userfaultfd (root, or
//! `vm.unprivileged_userfaultfd = 1`); with `CI` set its absence fails the test.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapshot::{
    compute_layout, empty_memory, ChunkSource, LazyMemory, LazyOptions, PageBitmap, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const CHUNK: u64 = 64 * 1024;
const HIGH: u64 = 0x1_0000_0000;

/// A memory file in memory: page `p` holds a pattern of `p`, except zero chunks.
struct FakeSource {
    file: Vec<u8>,
    zero_chunks: Vec<u64>,
    corrupt_chunk: Option<u64>,
    delay: Duration,
    fetches: AtomicU64,
}

impl FakeSource {
    fn new(len: u64, zero_chunks: Vec<u64>) -> Self {
        let mut file = vec![0u8; len as usize];
        for (page, bytes) in file.chunks_mut(PAGE_SIZE as usize).enumerate() {
            if !zero_chunks.contains(&(page as u64 * PAGE_SIZE / CHUNK)) {
                bytes.fill((page % 251) as u8 + 1);
            }
        }
        Self {
            file,
            zero_chunks,
            corrupt_chunk: None,
            delay: Duration::from_millis(5),
            fetches: AtomicU64::new(0),
        }
    }
}

impl ChunkSource for FakeSource {
    fn chunk_size(&self) -> u64 {
        CHUNK
    }
    fn is_zero(&self, index: u64) -> bool {
        self.zero_chunks.contains(&index)
    }
    fn fetch(&self, index: u64, len: usize) -> Result<Vec<u8>, String> {
        std::thread::sleep(self.delay);
        self.fetches.fetch_add(1, Ordering::SeqCst);
        if self.corrupt_chunk == Some(index) {
            return Err(format!("chunk {index} is corrupt: hash mismatch"));
        }
        let start = (index * CHUNK) as usize;
        Ok(self.file[start..start + len].to_vec())
    }
}

fn userfaultfd_available() -> bool {
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

fn options(fatal: Arc<Mutex<Option<String>>>, working_set: Option<PageBitmap>) -> LazyOptions {
    LazyOptions {
        fetchers: 2,
        working_set,
        on_fatal: Box::new(move |reason| *fatal.lock().unwrap() = Some(reason)),
        on_thread_start: Arc::new(|| {}),
    }
}

#[test]
fn pages_arrive_on_touch_and_by_streaming_and_match_the_file() {
    if !userfaultfd_available() {
        return;
    }
    // The second region is not a whole number of chunks: chunk 16 spans both regions.
    let layout = compute_layout(&[(0, 1 << 20), (HIGH, 520 * 1024)]).unwrap();
    let file_len = (1 << 20) + 520 * 1024;
    let source = Arc::new(FakeSource::new(file_len, vec![3, 7, 20]));
    let memory = empty_memory(&layout).unwrap();
    let fatal = Arc::new(Mutex::new(None));
    let mut working_set = PageBitmap::new(file_len / PAGE_SIZE);
    working_set.set(20 * (CHUNK / PAGE_SIZE) + 1); // a zero chunk: nothing to fetch
    working_set.set(12 * (CHUNK / PAGE_SIZE));
    let lazy = LazyMemory::start(
        &memory,
        &layout,
        source.clone(),
        options(fatal.clone(), Some(working_set)),
    )
    .unwrap();
    // A touch in the middle and one in the chunk that spans the regions, at once.
    let mut byte = [0u8; 1];
    memory
        .read_slice(&mut byte, GuestAddress(9 * CHUNK + 5))
        .unwrap();
    assert_eq!(byte[0], ((9 * CHUNK / PAGE_SIZE) % 251) as u8 + 1);
    // A zero chunk reads as zeros.
    memory
        .read_slice(&mut byte, GuestAddress(3 * CHUNK + 100))
        .unwrap();
    assert_eq!(byte[0], 0);
    assert!(
        lazy.wait_complete(Duration::from_secs(30)),
        "{:?}",
        lazy.stats()
    );
    let stats = lazy.stats();
    assert_eq!(stats.chunks_total, file_len.div_ceil(CHUNK));
    assert_eq!(stats.chunks_with_data, stats.chunks_total - 3);
    assert_eq!(stats.chunks_installed, stats.chunks_with_data);
    assert_eq!(
        source.fetches.load(Ordering::SeqCst),
        stats.chunks_with_data
    );
    assert!(stats.demand_faults >= 1);
    assert!(lazy.demand_pages().get(9 * CHUNK / PAGE_SIZE));
    // Every byte equals the file, in both regions.
    let mut low = vec![0u8; 1 << 20];
    memory.read_slice(&mut low, GuestAddress(0)).unwrap();
    assert!(low == source.file[..1 << 20], "low region differs");
    let mut high = vec![0u8; 520 * 1024];
    memory.read_slice(&mut high, GuestAddress(HIGH)).unwrap();
    assert!(high == source.file[1 << 20..], "high region differs");
    // Writes after completion are ordinary memory.
    memory
        .write_slice(&[0xAB], GuestAddress(HIGH + 4096))
        .unwrap();
    memory
        .read_slice(&mut byte, GuestAddress(HIGH + 4096))
        .unwrap();
    assert_eq!(byte[0], 0xAB);
    assert!(fatal.lock().unwrap().is_none());
}

#[test]
fn a_chunk_that_cannot_be_served_stops_the_stream_and_serves_no_bytes() {
    if !userfaultfd_available() {
        return;
    }
    let layout = compute_layout(&[(0, 1 << 20)]).unwrap();
    let mut fake = FakeSource::new(1 << 20, vec![]);
    fake.corrupt_chunk = Some(0);
    let source = Arc::new(fake);
    let memory = empty_memory(&layout).unwrap();
    let fatal = Arc::new(Mutex::new(None));
    let lazy = LazyMemory::start(&memory, &layout, source, options(fatal.clone(), None)).unwrap();
    assert!(!lazy.wait_complete(Duration::from_secs(30)));
    let reason = fatal.lock().unwrap().clone().expect("on_fatal was called");
    assert!(
        reason.contains("chunk 0") && reason.contains("corrupt"),
        "{reason}"
    );
    assert_eq!(lazy.stats().failed.as_deref(), Some(reason.as_str()));
    // A touch of the failed chunk blocks (no wrong byte): run it in a thread and see it wait.
    let host = memory.get_host_address(GuestAddress(100)).unwrap() as usize;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY (test): the address is inside guest memory, which outlives the process.
        let value = unsafe { std::ptr::read_volatile(host as *const u8) };
        let _ = tx.send(value);
    });
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    // The blocked reader stays blocked; leak the memory so it never reads unmapped pages.
    std::mem::forget(lazy);
    std::mem::forget(memory);
}
