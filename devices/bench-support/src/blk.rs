//! virtio-blk workloads: a mock driver keeps `QUEUE_DEPTH` requests in flight against a disk
//! file that sits in the page cache, so the figures are the device path's cost (parsing,
//! guest-memory access, syscalls, event loop), not a disk's.
//!
//! Requests are built as Linux builds them: a header, one descriptor per 4 KiB page, a status
//! byte, all in an indirect table.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::split_queue::{write_descs, DescSpec, DriverQueue, RingLayout};
use crate::{BenchError, CpuMeter, IoFigure, XorShift};
use devices::interrupt::IrqFdLine;
use devices::rate_limiter::{RateLimiterConfig, RateLimiterUpdate};
use devices::virtio::block::{disk_from_file, process_queue, Block, Disk, SECTOR_SIZE};
use devices::virtio::{ActivationContext, VirtioDevice, VirtioInterrupt};
use devices::GuestMemory;

/// Requests in flight per batch (a guest's typical nr_requests per hw queue is larger; 32
/// keeps the mock memory small and is where the device's per-request cost dominates).
pub const QUEUE_DEPTH: u16 = 32;
/// Size of the scratch disk: fits the page cache of any host worth benchmarking on.
pub const DISK_BYTES: u64 = 256 << 20;
const QUEUE_SIZE: u16 = devices::virtio::block::QUEUE_SIZE;
const PAGE: u64 = 4096;
const MAX_REQUEST: u64 = 1 << 20;
// Mock guest memory layout.
const MEM_BYTES: usize = 64 << 20;
const RINGS: u64 = 0;
const HEADERS: u64 = 0x10_0000;
const STATUS: u64 = 0x18_0000;
const TABLES: u64 = 0x20_0000;
const TABLE_STRIDE: u64 = 0x2000; // room for 1 + 256 + 1 descriptors
const DATA: u64 = 0x100_0000;

/// One row of the blk table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkWorkload {
    /// Short name for bench output ("4k-randread").
    pub name: &'static str,
    /// Human description for tables.
    pub label: &'static str,
    pub write: bool,
    pub random: bool,
    /// Bytes per request: a multiple of 4 KiB, at most 1 MiB.
    pub len: u64,
}

impl BlkWorkload {
    pub const RAND_READ_4K: Self = Self {
        name: "4k-randread",
        label: "4 KiB random read",
        write: false,
        random: true,
        len: 4096,
    };
    pub const RAND_WRITE_4K: Self = Self {
        name: "4k-randwrite",
        label: "4 KiB random write",
        write: true,
        random: true,
        len: 4096,
    };
    pub const SEQ_READ_1M: Self = Self {
        name: "1m-seqread",
        label: "1 MiB sequential read",
        write: false,
        random: false,
        len: 1 << 20,
    };
    pub const SEQ_WRITE_1M: Self = Self {
        name: "1m-seqwrite",
        label: "1 MiB sequential write",
        write: true,
        random: false,
        len: 1 << 20,
    };

    /// The four rows the issue asks for.
    pub const STANDARD: [Self; 4] = [
        Self::RAND_READ_4K,
        Self::RAND_WRITE_4K,
        Self::SEQ_READ_1M,
        Self::SEQ_WRITE_1M,
    ];
}

/// A temporary disk image of `bytes` real (non-hole) data, already unlinked, so reads come
/// from the page cache. The file lives in $TMPDIR.
pub fn scratch_disk(bytes: u64) -> Result<Disk, BenchError> {
    // Unique per call: tests (and benches) in one process may build several at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir();
    let path = dir.join(format!("dormouse-blk-bench-{}-{seq}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(BenchError::io(format!("creating {}", path.display())))?;
    // Unlinked at once: nothing is left behind, whatever happens next.
    std::fs::remove_file(&path).map_err(BenchError::io(format!("unlinking {}", path.display())))?;
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..bytes.div_ceil(1 << 20) {
        file.write_all(&chunk)
            .map_err(BenchError::io("filling the scratch disk"))?;
    }
    disk_from_file(file, false, "bench").map_err(BenchError::io("sizing the scratch disk"))
}

/// A second handle on the same disk file (a `Block` device takes its disk by value).
pub fn clone_disk(disk: &Disk) -> Result<Disk, BenchError> {
    Ok(Disk {
        file: disk.file.try_clone().map_err(BenchError::io(format!(
            "duplicating disk fd {}",
            disk.file.as_raw_fd()
        )))?,
        capacity_sectors: disk.capacity_sectors,
        read_only: disk.read_only,
        id: disk.id,
    })
}

/// The mock guest: memory, the request queue's driver side, and where the next request goes.
struct BlkDriver {
    mem: GuestMemory,
    queue: DriverQueue,
    workload: BlkWorkload,
    disk_slots: u64,
    rng: XorShift,
    cursor: u64,
}

impl BlkDriver {
    fn new(workload: BlkWorkload, disk: &Disk) -> Result<Self, BenchError> {
        if workload.len == 0 || !workload.len.is_multiple_of(PAGE) || workload.len > MAX_REQUEST {
            return Err(BenchError::Setup {
                what: "blk workload",
                why: format!("request size {} is not 4 KiB..1 MiB in pages", workload.len),
            });
        }
        let disk_bytes = disk.capacity_sectors * SECTOR_SIZE;
        let disk_slots = disk_bytes / workload.len;
        if disk_slots == 0 {
            return Err(BenchError::Setup {
                what: "blk workload",
                why: format!("disk of {disk_bytes} bytes is smaller than one request"),
            });
        }
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_BYTES)])
            .map_err(BenchError::memory)?;
        let queue = DriverQueue::new(&mem, RingLayout::packed(GuestAddress(RINGS), QUEUE_SIZE))?;
        Ok(Self {
            mem,
            queue,
            workload,
            disk_slots,
            rng: XorShift::new(0x1234_5678),
            cursor: 0,
        })
    }

    fn next_sector(&mut self) -> u64 {
        let slot = if self.workload.random {
            self.rng.next_u64() % self.disk_slots
        } else {
            self.cursor = (self.cursor + 1) % self.disk_slots;
            self.cursor
        };
        slot * (self.workload.len / SECTOR_SIZE)
    }

    /// Queues request `slot` (< QUEUE_DEPTH) at the workload's next offset.
    fn add(&mut self, slot: u16) -> Result<(), BenchError> {
        let slot64 = u64::from(slot);
        let sector = self.next_sector();
        let w = self.workload;
        let header = HEADERS + slot64 * 16;
        let mut h = [0u8; 16];
        let request_type = if w.write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&h, GuestAddress(header))
            .map_err(BenchError::memory)?;
        let status = STATUS + slot64;
        self.mem
            .write_obj(0xffu8, GuestAddress(status))
            .map_err(BenchError::memory)?;

        let next = VRING_DESC_F_NEXT as u16;
        let data_flags = if w.write {
            next
        } else {
            next | VRING_DESC_F_WRITE as u16
        };
        let pages = (w.len / PAGE) as u16; // <= 256, checked in `new`
        let data = DATA + slot64 * MAX_REQUEST;
        let mut descs = Vec::with_capacity(usize::from(pages) + 2);
        descs.push(DescSpec {
            addr: header,
            len: 16,
            flags: next,
            next: 1,
        });
        for p in 0..pages {
            descs.push(DescSpec {
                addr: data + u64::from(p) * PAGE,
                len: PAGE as u32,
                flags: data_flags,
                next: p + 2,
            });
        }
        descs.push(DescSpec {
            addr: status,
            len: 1,
            flags: VRING_DESC_F_WRITE as u16,
            next: 0,
        });
        let table = TABLES + slot64 * TABLE_STRIDE;
        write_descs(&self.mem, GuestAddress(table), &descs)?;
        self.queue.set_desc(
            slot,
            DescSpec {
                addr: table,
                len: 16 * (u32::from(pages) + 2),
                flags: VRING_DESC_F_INDIRECT as u16,
                next: 0,
            },
        )?;
        self.queue.make_available(slot)
    }

    fn submit_batch(&mut self) -> Result<(), BenchError> {
        for slot in 0..QUEUE_DEPTH {
            self.add(slot)?;
        }
        self.queue.publish()
    }

    /// Reaps the whole batch and checks that every request succeeded with the right length.
    fn reap_batch(&mut self) -> Result<(), BenchError> {
        let want_len = if self.workload.write {
            1
        } else {
            self.workload.len + 1
        };
        for _ in 0..QUEUE_DEPTH {
            let used = self
                .queue
                .pop_used()?
                .ok_or_else(|| BenchError::Check("a request was not completed".into()))?;
            let status: u8 = self
                .mem
                .read_obj(GuestAddress(STATUS + u64::from(used.id)))
                .map_err(BenchError::memory)?;
            if u32::from(status) != VIRTIO_BLK_S_OK || u64::from(used.len) != want_len {
                return Err(BenchError::Check(format!(
                    "request {} completed with status {status}, length {}",
                    used.id, used.len
                )));
            }
        }
        Ok(())
    }
}

fn figure(w: BlkWorkload, requests: u64, start: Instant, meter: &CpuMeter) -> IoFigure {
    IoFigure {
        ops: requests,
        bytes: requests * w.len,
        wall: start.elapsed(),
        cpu: meter.total(),
        lost: 0,
    }
}

/// The request path alone: batches of `QUEUE_DEPTH` requests through `process_queue`.
pub fn run_handler(
    w: BlkWorkload,
    disk: &Disk,
    duration: Duration,
) -> Result<IoFigure, BenchError> {
    let mut driver = BlkDriver::new(w, disk)?;
    let mut queue: Queue = driver.queue.device_queue(false)?;
    let mut one_batch = |driver: &mut BlkDriver, meter: &mut CpuMeter| -> Result<(), BenchError> {
        driver.submit_batch()?;
        let run = meter.measure(|| process_queue(&mut queue, &driver.mem, disk))?;
        if run.completed != u32::from(QUEUE_DEPTH) {
            return Err(BenchError::Check(format!(
                "{} of {QUEUE_DEPTH} completed",
                run.completed
            )));
        }
        driver.reap_batch()
    };
    // Warm-up: faults in the data buffers so the first timed batch does not pay for it.
    one_batch(&mut driver, &mut CpuMeter::new())?;
    let (mut meter, mut requests, start) = (CpuMeter::new(), 0u64, Instant::now());
    while start.elapsed() < duration {
        one_batch(&mut driver, &mut meter)?;
        requests += u64::from(QUEUE_DEPTH);
    }
    Ok(figure(w, requests, start, &meter))
}

/// The whole device as the VMM runs it: queue-notify eventfd, event loop, irqfd interrupt.
pub fn run_device(w: BlkWorkload, disk: &Disk, duration: Duration) -> Result<IoFigure, BenchError> {
    run_device_limited(w, disk, None, duration)
}

/// `run_device` with the device's rate limiter set to `limit`. A throttled batch completes over
/// several event-loop passes (the limiter's timer wakes the device); the first `duration / 4`
/// is spent draining the limiter's initial full bucket and not measured, so the figure is the
/// steady rate.
pub fn run_device_limited(
    w: BlkWorkload,
    disk: &Disk,
    limit: Option<RateLimiterConfig>,
    duration: Duration,
) -> Result<IoFigure, BenchError> {
    let mut driver = BlkDriver::new(w, disk)?;
    let mut block = Block::from_disk(clone_disk(disk)?).map_err(|e| BenchError::Setup {
        what: "virtio-blk device",
        why: e.to_string(),
    })?;
    if let Some(limit) = limit {
        block
            .update_rate_limiter(&RateLimiterUpdate::replace_with(&limit))
            .map_err(|e| BenchError::Setup {
                what: "virtio-blk rate limiter",
                why: e.to_string(),
            })?;
    }
    let block = Arc::new(Mutex::new(block));
    let mut manager = EventManager::<Arc<Mutex<Block>>>::new()
        .map_err(|e| BenchError::EventLoop(e.to_string()))?;
    manager.add_subscriber(block.clone());
    let notify = EventFd::new(EFD_NONBLOCK).map_err(BenchError::io("queue eventfd"))?;
    let irq = EventFd::new(EFD_NONBLOCK).map_err(BenchError::io("irq eventfd"))?;
    let line = IrqFdLine(irq.try_clone().map_err(BenchError::io("irq eventfd"))?);
    let ctx = ActivationContext {
        mem: driver.mem.clone(),
        acked_features: 0,
        queues: vec![driver.queue.device_queue(false)?],
        queue_events: vec![notify
            .try_clone()
            .map_err(BenchError::io("queue eventfd"))?],
        interrupt: Arc::new(VirtioInterrupt::new(Arc::new(line))),
    };
    block
        .lock()
        .map_err(|_| BenchError::Check("device lock poisoned".into()))?
        .activate(ctx)
        .map_err(|e| BenchError::Setup {
            what: "virtio-blk activation",
            why: e.to_string(),
        })?;
    // Let the device register its queue eventfd.
    run_loop(&mut manager)?;

    let mut one_batch = |driver: &mut BlkDriver, meter: &mut CpuMeter| -> Result<(), BenchError> {
        driver.submit_batch()?;
        notify
            .write(1)
            .map_err(BenchError::io("kicking the queue"))?;
        let target = driver.queue.avail_idx();
        meter.measure(|| run_loop(&mut manager))?;
        // Throttled: the rest of the batch is served as the limiter's timer fires.
        while driver.queue.used_idx()? != target {
            meter.measure(|| run_loop(&mut manager))?;
        }
        driver.reap_batch()?;
        // The guest would take the interrupt here.
        irq.read()
            .map_err(BenchError::io("no interrupt for a completed batch"))?;
        Ok(())
    };
    one_batch(&mut driver, &mut CpuMeter::new())?;
    if limit.is_some() {
        let warm_up = Instant::now();
        while warm_up.elapsed() < duration / 4 {
            one_batch(&mut driver, &mut CpuMeter::new())?;
        }
    }
    let (mut meter, mut requests, start) = (CpuMeter::new(), 0u64, Instant::now());
    while start.elapsed() < duration {
        one_batch(&mut driver, &mut meter)?;
        requests += u64::from(QUEUE_DEPTH);
    }
    Ok(figure(w, requests, start, &meter))
}

/// One pass of the event loop; a second means the device did not see the kick.
fn run_loop<T>(manager: &mut EventManager<T>) -> Result<(), BenchError>
where
    T: event_manager::MutEventSubscriber,
{
    let n = manager
        .run_with_timeout(1000)
        .map_err(|e| BenchError::EventLoop(e.to_string()))?;
    if n == 0 {
        return Err(BenchError::Check(
            "the device did not wake up within 1 s".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_disk() -> Disk {
        scratch_disk(4 << 20).unwrap()
    }

    #[test]
    fn handler_completes_every_workload() {
        let disk = small_disk();
        for w in BlkWorkload::STANDARD {
            let f = run_handler(w, &disk, Duration::from_millis(5)).unwrap();
            assert!(f.ops >= u64::from(QUEUE_DEPTH), "{}: {f:?}", w.name);
            assert_eq!(f.bytes, f.ops * w.len);
        }
    }

    #[test]
    fn device_writes_reach_the_file() {
        use std::os::unix::fs::FileExt;
        let disk = small_disk();
        let mut before = vec![0u8; 4 << 20];
        disk.file.read_exact_at(&mut before, 0).unwrap();
        assert!(before.iter().all(|&b| b == 0x5a));
        // The mock guest's write buffers are fresh (zeroed) memory, and a 32-request batch of
        // 1 MiB writes covers the whole 4 MiB disk.
        let f = run_device(BlkWorkload::SEQ_WRITE_1M, &disk, Duration::from_millis(5)).unwrap();
        assert!(f.ops >= u64::from(QUEUE_DEPTH));
        assert!(f.cpu.total() > Duration::ZERO);
        let mut after = vec![0xffu8; 4 << 20];
        disk.file.read_exact_at(&mut after, 0).unwrap();
        assert!(after.iter().all(|&b| b == 0));
        // Reads: `reap_batch` checks every request's status and used length.
        let f = run_device(BlkWorkload::RAND_READ_4K, &disk, Duration::from_millis(5)).unwrap();
        assert!(f.ops >= u64::from(QUEUE_DEPTH));
    }

    #[test]
    fn a_limited_device_completes_every_batch() {
        let disk = small_disk();
        let limit = RateLimiterConfig {
            bandwidth: None,
            ops: Some(devices::rate_limiter::TokenBucketConfig {
                size: 16,
                one_time_burst: None,
                refill_time: 10,
            }),
        };
        let f = run_device_limited(
            BlkWorkload::RAND_READ_4K,
            &disk,
            Some(limit),
            Duration::from_millis(40),
        )
        .unwrap();
        assert!(f.ops >= u64::from(QUEUE_DEPTH), "{f:?}");
    }

    #[test]
    fn rejects_unaligned_requests() {
        let disk = small_disk();
        let w = BlkWorkload {
            len: 1000,
            ..BlkWorkload::RAND_READ_4K
        };
        assert!(run_handler(w, &disk, Duration::ZERO).is_err());
    }
}
