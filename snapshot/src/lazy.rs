//! Lazy restore: guest RAM starts empty and is filled on first touch from a [`ChunkSource`]
//! (a snapshot store far away), while a background stream fills the rest.
//!
//! Guest RAM is anonymous memory registered with `userfaultfd` (missing pages). A fault (by a
//! vCPU through KVM, or by a device thread) names a page; the page's chunk of the memory file is
//! queued first, its successor next (read-ahead), and fetcher threads copy whole chunks in with
//! `UFFDIO_COPY`, which wakes every thread waiting on them. Meanwhile the fetchers stream the
//! other chunks: those holding the snapshot's working set first, then the rest in file order.
//! Once every chunk is in, the ranges are unregistered and the threads end.
//!
//! - All-zero chunks are never fetched: a fault in one maps the zero page.
//! - A page faulted again after its chunk was installed was discarded (`madvise`): it gets the
//!   zero page, as discarded anonymous memory would.
//! - A chunk that cannot be fetched or fails its check stops the stream and calls the owner's
//!   `on_fatal` (the VMM stops the VM); threads waiting on its pages stay blocked: a wrong byte
//!   is never served.
//! - Pages faulted before the stream reached them are recorded ([`LazyMemory::demand_pages`]):
//!   the working set of the next snapshot.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryBackend;

use crate::error::{io_err, Result, SnapshotError};
use crate::layout::{MemoryRegion, PAGE_SIZE};
use crate::manifest::{Manifest, SnapshotKind};
use crate::page_bitmap::PageBitmap;
use crate::restore::{empty_memory, GuestMemory, LoadedSnapshot};
use crate::state;
use crate::userfault::Userfaultfd;

/// Where a lazily restored memory file's chunks come from.
pub trait ChunkSource: Send + Sync {
    /// Bytes per chunk: a multiple of [`PAGE_SIZE`]. The file's last chunk may be shorter.
    fn chunk_size(&self) -> u64;
    /// Whether chunk `index` is all zeros (nothing to fetch).
    fn is_zero(&self, index: u64) -> bool;
    /// Chunk `index`: exactly `len` bytes, checked against what the snapshot recorded. Blocks;
    /// retries are the source's business: an error here is final.
    fn fetch(&self, index: u64, len: usize) -> std::result::Result<Vec<u8>, String>;
}

/// Tuning and hooks for [`LazyMemory::start`].
pub struct LazyOptions {
    /// Chunks fetched at once.
    pub fetchers: usize,
    /// Memory-file pages to stream before the others (the snapshot's working set).
    pub working_set: Option<PageBitmap>,
    /// Called once, from a fetcher thread, when a chunk cannot be served.
    pub on_fatal: Box<dyn Fn(String) + Send + Sync>,
    /// Run first on every thread this starts (seccomp filters).
    pub on_thread_start: Arc<dyn Fn() + Send + Sync>,
}

/// How far a lazy restore has come.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LazyStats {
    pub chunks_total: u64,
    /// Chunks holding data (the others are zero and never fetched).
    pub chunks_with_data: u64,
    pub chunks_installed: u64,
    /// Faults on pages whose chunk had not arrived yet.
    pub demand_faults: u64,
    /// Bytes of chunk data installed so far (uncompressed).
    pub bytes_installed: u64,
    pub complete: bool,
    pub failed: Option<String>,
}

/// One region's host mapping and its place in the memory file.
#[derive(Clone, Copy, Debug)]
struct HostRegion {
    host: u64,
    file_offset: u64,
    size: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Missing,
    InFlight,
    Installed,
}

struct State {
    chunks: Vec<ChunkState>,
    urgent: VecDeque<u64>,
    /// Streaming order (working set first); `cursor` is the next candidate.
    background: Vec<u64>,
    cursor: usize,
    demand: PageBitmap,
    stats: LazyStats,
    stop: bool,
    /// `on_fatal` has returned: `wait_complete` reports a failure only after the VMM was told.
    fatal_reported: bool,
}

struct Shared {
    uffd: Userfaultfd,
    regions: Vec<HostRegion>,
    file_len: u64,
    chunk_size: u64,
    source: Arc<dyn ChunkSource>,
    state: Mutex<State>,
    changed: Condvar,
    on_fatal: Box<dyn Fn(String) + Send + Sync>,
    /// Written to wake the fault thread (stop, completion).
    wake: OwnedFd,
}

/// Guest memory being filled lazily; dropping it stops the threads (the memory must then not
/// be touched: missing pages would wait forever).
pub struct LazyMemory {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Restores a snapshot's state with empty guest memory, for [`LazyMemory::start`]: the
/// directory needs `manifest.json` and `state.bin` only (its memory comes from elsewhere). Only
/// full snapshots: a store always holds one.
pub fn load_snapshot_without_memory<T: state::SavedState>(dir: &Path) -> Result<LoadedSnapshot<T>> {
    let manifest = Manifest::read(dir)?;
    if manifest.kind != SnapshotKind::Full {
        return Err(SnapshotError::InvalidRequest(format!(
            "{}: a lazy restore needs a full snapshot, not a diff",
            dir.display()
        )));
    }
    let state = state::read_state(dir)?;
    let memory = empty_memory(&manifest.regions)?;
    Ok(LoadedSnapshot {
        manifest,
        state,
        memory,
    })
}

impl LazyMemory {
    /// Registers `memory` (fresh, untouched anonymous memory laid out as `layout`) with
    /// userfaultfd and starts serving it from `source`. Fails (with nothing started) when
    /// userfaultfd is unavailable: the caller then fetches everything first.
    pub fn start(
        memory: &GuestMemory,
        layout: &[MemoryRegion],
        source: Arc<dyn ChunkSource>,
        options: LazyOptions,
    ) -> Result<Self> {
        let chunk_size = source.chunk_size();
        if chunk_size == 0 || !chunk_size.is_multiple_of(PAGE_SIZE) {
            return Err(SnapshotError::InvalidRequest(format!(
                "chunk size {chunk_size} is not a multiple of the page size"
            )));
        }
        let regions: Vec<HostRegion> = memory
            .iter()
            .zip(layout)
            .map(|(region, laid)| HostRegion {
                host: region.as_ptr() as u64,
                file_offset: laid.file_offset,
                size: region.size() as u64,
            })
            .collect();
        if regions.len() != layout.len() {
            return Err(SnapshotError::InvalidRequest(
                "guest memory does not match the snapshot layout".into(),
            ));
        }
        let file_len = layout
            .last()
            .map(|r| r.file_offset + r.size)
            .unwrap_or_default();
        let chunk_count = file_len.div_ceil(chunk_size);
        let uffd = Userfaultfd::new().map_err(io_err("userfaultfd", Path::new("guest memory")))?;
        for region in &regions {
            uffd.register_missing(region.host, region.size)
                .map_err(io_err(
                    "register with userfaultfd",
                    Path::new("guest memory"),
                ))?;
        }
        // SAFETY: eventfd takes flags only and returns a new fd or -1.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(io_err("eventfd", Path::new("lazy memory"))(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };

        let mut chunks = vec![ChunkState::Missing; usize_of(chunk_count)?];
        let mut with_data = 0u64;
        for (index, chunk) in chunks.iter_mut().enumerate() {
            if source.is_zero(index as u64) {
                // Nothing to fetch: a fault here maps the zero page.
                *chunk = ChunkState::Installed;
            } else {
                with_data += 1;
            }
        }
        let background = streaming_order(&chunks, chunk_size, options.working_set.as_ref());
        let total_pages = file_len / PAGE_SIZE;
        let shared = Arc::new(Shared {
            uffd,
            regions,
            file_len,
            chunk_size,
            source,
            state: Mutex::new(State {
                chunks,
                urgent: VecDeque::new(),
                background,
                cursor: 0,
                demand: PageBitmap::new(total_pages),
                stats: LazyStats {
                    chunks_total: chunk_count,
                    chunks_with_data: with_data,
                    ..Default::default()
                },
                stop: false,
                fatal_reported: false,
            }),
            changed: Condvar::new(),
            on_fatal: options.on_fatal,
            wake,
        });
        let mut threads = Vec::new();
        let spawn = |name: String, body: Box<dyn FnOnce() + Send>| {
            let hook = Arc::clone(&options.on_thread_start);
            std::thread::Builder::new().name(name).spawn(move || {
                hook();
                body();
            })
        };
        let fault_shared = Arc::clone(&shared);
        threads.push(
            spawn(
                "lazy-faults".into(),
                Box::new(move || serve_faults(&fault_shared)),
            )
            .map_err(io_err("spawn", Path::new("lazy-faults thread")))?,
        );
        for n in 0..options.fetchers.max(1) {
            let worker = Arc::clone(&shared);
            match spawn(
                format!("lazy-fetch-{n}"),
                Box::new(move || fetch_loop(&worker)),
            ) {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    let lazy = Self { shared, threads };
                    drop(lazy);
                    return Err(io_err("spawn", Path::new("lazy-fetch thread"))(e));
                }
            }
        }
        // A snapshot without data completes at once.
        complete_if_done(&shared, &mut lock(&shared.state));
        Ok(Self { shared, threads })
    }

    pub fn stats(&self) -> LazyStats {
        lock(&self.shared.state).stats.clone()
    }

    /// Memory-file pages the guest (or the VMM) touched before the stream brought them.
    pub fn demand_pages(&self) -> PageBitmap {
        lock(&self.shared.state).demand.clone()
    }

    /// Waits until every chunk is in (true) or it failed or `timeout` passed (false).
    pub fn wait_complete(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.shared.state);
        loop {
            if state.stats.complete {
                return true;
            }
            if state.fatal_reported || state.stop {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = match self.shared.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.changed.notify_all();
        poke(&self.shared);
        // The fault thread ends at once; a fetcher may be inside a slow fetch and ends after
        // it (it touches nothing once stopped), so it is not waited for.
        for thread in self.threads.drain(..1.min(self.threads.len())) {
            let _ = thread.join();
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn usize_of(n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| SnapshotError::InvalidRequest(format!("{n} chunks")))
}

fn poke(shared: &Shared) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to our own eventfd.
    let _ = unsafe { libc::write(shared.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// Chunks with data in streaming order: those holding working-set pages first.
fn streaming_order(
    chunks: &[ChunkState],
    chunk_size: u64,
    working_set: Option<&PageBitmap>,
) -> Vec<u64> {
    let pages_per_chunk = chunk_size / PAGE_SIZE;
    let mut first = vec![false; chunks.len()];
    if let Some(set) = working_set {
        for (start, count) in set.runs() {
            let from = start / pages_per_chunk;
            let to = (start + count - 1) / pages_per_chunk;
            for chunk in from..=to {
                if let Some(flag) = usize::try_from(chunk).ok().and_then(|c| first.get_mut(c)) {
                    *flag = true;
                }
            }
        }
    }
    let data = |&(_, state): &(usize, &ChunkState)| *state == ChunkState::Missing;
    let hot = chunks
        .iter()
        .enumerate()
        .filter(data)
        .filter(|(i, _)| first[*i])
        .map(|(i, _)| i as u64);
    let cold = chunks
        .iter()
        .enumerate()
        .filter(data)
        .filter(|(i, _)| !first[*i])
        .map(|(i, _)| i as u64);
    hot.chain(cold).collect()
}

impl Shared {
    /// The memory-file offset of a host address inside guest RAM.
    fn file_offset_of(&self, host: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| host >= r.host && host - r.host < r.size)
            .map(|r| r.file_offset + (host - r.host))
    }

    fn chunk_len(&self, index: u64) -> u64 {
        let start = index * self.chunk_size;
        self.chunk_size.min(self.file_len.saturating_sub(start))
    }

    /// The host ranges chunk `index` covers: (host address, offset in the chunk, length).
    fn pieces(&self, index: u64) -> Vec<(u64, u64, u64)> {
        let start = index * self.chunk_size;
        let end = start + self.chunk_len(index);
        self.regions
            .iter()
            .filter_map(|r| {
                let from = start.max(r.file_offset);
                let to = end.min(r.file_offset + r.size);
                (from < to).then(|| (r.host + (from - r.file_offset), from - start, to - from))
            })
            .collect()
    }
}

/// The fault thread: turns faults into urgent chunk requests.
fn serve_faults(shared: &Shared) {
    let mut faults = Vec::new();
    loop {
        {
            let state = lock(&shared.state);
            if state.stop || state.stats.complete {
                return;
            }
        }
        match shared.uffd.wait(shared.wake.as_raw_fd(), 1000) {
            Ok(true) => {
                let mut drained = [0u8; 8];
                // SAFETY: reads at most 8 bytes into a live buffer from our own eventfd.
                let _ = unsafe {
                    libc::read(
                        shared.wake.as_raw_fd(),
                        drained.as_mut_ptr().cast(),
                        drained.len(),
                    )
                };
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!("lazy memory: waiting for page faults: {e}");
                return;
            }
        }
        if let Err(e) = shared.uffd.read_faults(&mut faults) {
            tracing::error!("lazy memory: reading page faults: {e}");
            return;
        }
        for fault in &faults {
            handle_fault(shared, fault.address);
        }
    }
}

fn handle_fault(shared: &Shared, address: u64) {
    let page = address & !(PAGE_SIZE - 1);
    let Some(offset) = shared.file_offset_of(page) else {
        tracing::warn!("lazy memory: fault at {address:#x}, outside guest RAM");
        return;
    };
    let index = offset / shared.chunk_size;
    let mut state = lock(&shared.state);
    let Some(chunk) = usize::try_from(index)
        .ok()
        .and_then(|i| state.chunks.get(i).copied())
    else {
        return;
    };
    match chunk {
        ChunkState::Installed => {
            drop(state);
            // A zero chunk, or a page discarded after install: both read as zeros. A page that
            // is present already (the fault raced with its chunk's copy) stays as it is.
            if let Err(e) = shared.uffd.zero(page, PAGE_SIZE, PAGE_SIZE) {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    tracing::error!("lazy memory: zero page at {page:#x}: {e}");
                }
            }
        }
        ChunkState::InFlight => {
            state.demand.set(offset / PAGE_SIZE);
            state.stats.demand_faults += 1;
        }
        ChunkState::Missing => {
            state.demand.set(offset / PAGE_SIZE);
            state.stats.demand_faults += 1;
            if !state.urgent.contains(&index) {
                state.urgent.push_front(index);
            }
            // Read-ahead: the guest tends to walk on.
            let next = index + 1;
            let next_missing = usize::try_from(next)
                .ok()
                .and_then(|i| state.chunks.get(i))
                .is_some_and(|c| *c == ChunkState::Missing);
            if next_missing && !state.urgent.contains(&next) {
                state.urgent.push_back(next);
            }
            drop(state);
            shared.changed.notify_all();
        }
    }
}

/// The next chunk to fetch, marked in flight; `None` when there is nothing left or it stopped.
fn next_chunk(shared: &Shared) -> Option<u64> {
    let mut state = lock(&shared.state);
    loop {
        if state.stop || state.stats.failed.is_some() || state.stats.complete {
            return None;
        }
        let is_missing =
            |s: &State, c: u64| s.chunks.get(c as usize).copied() == Some(ChunkState::Missing);
        while let Some(c) = state.urgent.pop_front() {
            if is_missing(&state, c) {
                state.chunks[c as usize] = ChunkState::InFlight;
                return Some(c);
            }
        }
        while state.cursor < state.background.len() {
            let c = state.background[state.cursor];
            state.cursor += 1;
            if is_missing(&state, c) {
                state.chunks[c as usize] = ChunkState::InFlight;
                return Some(c);
            }
        }
        // Everything is in flight elsewhere: wait for a fault or the end.
        state = match shared.changed.wait(state) {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
    }
}

fn fetch_loop(shared: &Shared) {
    while let Some(index) = next_chunk(shared) {
        let len = shared.chunk_len(index);
        let result = usize::try_from(len)
            .map_err(|_| format!("chunk of {len} bytes"))
            .and_then(|len| shared.source.fetch(index, len))
            .and_then(|bytes| {
                if bytes.len() as u64 == len {
                    Ok(bytes)
                } else {
                    Err(format!("{} bytes, expected {len}", bytes.len()))
                }
            });
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(reason) => {
                fail(shared, format!("memory chunk {index}: {reason}"));
                return;
            }
        };
        if lock(&shared.state).stop {
            return;
        }
        for (host, at, piece_len) in shared.pieces(index) {
            // `at + piece_len <= len`, which fit in usize above.
            let piece = &bytes[at as usize..(at + piece_len) as usize];
            if let Err(e) = shared.uffd.copy_skipping_present(host, piece, PAGE_SIZE) {
                fail(
                    shared,
                    format!("installing memory chunk {index} at {host:#x}: {e}"),
                );
                return;
            }
        }
        let mut state = lock(&shared.state);
        if let Some(chunk) = state.chunks.get_mut(index as usize) {
            *chunk = ChunkState::Installed;
        }
        state.stats.chunks_installed += 1;
        state.stats.bytes_installed += len;
        complete_if_done(shared, &mut state);
        drop(state);
        shared.changed.notify_all();
    }
}

fn complete_if_done(shared: &Shared, state: &mut State) {
    if state.stats.complete || state.stats.chunks_installed < state.stats.chunks_with_data {
        return;
    }
    // Every page is in or zero: ordinary anonymous memory from here on.
    for region in &shared.regions {
        if let Err(e) = shared.uffd.unregister(region.host, region.size) {
            tracing::warn!("lazy memory: unregistering guest RAM: {e}");
        }
    }
    state.stats.complete = true;
    shared.changed.notify_all();
    poke(shared);
    tracing::debug!(
        chunks = state.stats.chunks_installed,
        demand_faults = state.stats.demand_faults,
        "lazy memory: every chunk is in"
    );
}

fn fail(shared: &Shared, reason: String) {
    let mut state = lock(&shared.state);
    if state.stats.failed.is_some() || state.stop {
        return;
    }
    state.stats.failed = Some(reason.clone());
    drop(state);
    tracing::error!("lazy memory: {reason}; the VM cannot continue");
    (shared.on_fatal)(reason);
    // Waiters learn of the failure once the VMM has been told (and not before: a waiter that
    // then asks whether the VM was stopped finds it was).
    lock(&shared.state).fatal_reported = true;
    shared.changed.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_working_set_streams_first_and_zero_chunks_never() {
        let chunk_size = 4 * PAGE_SIZE;
        let mut chunks = vec![ChunkState::Missing; 6];
        chunks[2] = ChunkState::Installed; // an all-zero chunk
        let mut set = PageBitmap::new(24);
        set.set(17); // chunk 4
        set.set_range(7, 2); // pages 7 and 8: chunks 1 and 2
        let order = streaming_order(&chunks, chunk_size, Some(&set));
        assert_eq!(order, vec![1, 4, 0, 3, 5]);
        assert_eq!(
            streaming_order(&chunks, chunk_size, None),
            vec![0, 1, 3, 4, 5]
        );
    }
}
