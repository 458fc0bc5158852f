//! virtio-blk throughput and VMM CPU cost per request, with an in-process driver: requests are
//! written into guest memory and a split queue the way a guest would, then handed to the device
//! code. The disk is a temporary file that fits in the page cache, so this measures the device
//! path (parsing, guest-memory access, syscalls), not a disk.
//!
//! `cargo bench -p devices --bench virtio_blk` (BENCH_SECS=n per row, default 2).

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::interrupt::CountingLine;
use devices::virtio::block::{disk_from_file, process_queue, Block, Disk};
use devices::virtio::{ActivationContext, VirtioDevice, VirtioInterrupt};
use devices::GuestMemory;
use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 256;
const DEPTH: u64 = 32;
const PAGE: u64 = 4096;
const DISK_BYTES: u64 = 256 << 20;
const MEM_BYTES: usize = 128 << 20;
// Guest memory layout.
const RINGS: u64 = 0;
const HEADERS: u64 = 0x10_0000;
const TABLES: u64 = 0x20_0000;
const DATA: u64 = 0x100_0000;

struct Driver {
    avail_idx: u16,
}

impl Driver {
    fn queue() -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_desc_table_address(Some(RINGS as u32), Some(0));
        q.set_avail_ring_address(Some((RINGS + 0x1000) as u32), Some(0));
        q.set_used_ring_address(Some((RINGS + 0x2000) as u32), Some(0));
        q.set_ready(true);
        q
    }

    fn desc(mem: &GuestMemory, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

    /// Queues request `slot` (< DEPTH): `len` bytes at `sector`, one descriptor per 4 KiB page
    /// as Linux builds them, through an indirect table.
    fn add(&mut self, mem: &GuestMemory, slot: u64, write: bool, sector: u64, len: u64) {
        let hdr = HEADERS + slot * 16;
        let mut h = [0u8; 16];
        let t = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let table = TABLES + slot * 0x2000;
        let pages = len / PAGE;
        let next = VRING_DESC_F_NEXT as u16;
        let data_flags = if write {
            next
        } else {
            next | VRING_DESC_F_WRITE as u16
        };
        Self::desc(mem, table, hdr, 16, next, 1);
        let data = DATA + slot * (1 << 20);
        for p in 0..pages {
            let i = 1 + p as u16;
            Self::desc(
                mem,
                table + 16 * u64::from(i),
                data + p * PAGE,
                PAGE as u32,
                data_flags,
                i + 1,
            );
        }
        let status = pages as u16 + 1;
        let status_byte = HEADERS + 0x8_0000 + slot;
        Self::desc(
            mem,
            table + 16 * u64::from(status),
            status_byte,
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        );
        let head = slot as u16;
        Self::desc(
            mem,
            RINGS + 16 * u64::from(head),
            table,
            16 * (u32::from(status) + 1),
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        let ring_slot = RINGS + 0x1000 + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        mem.write_obj(head, GuestAddress(ring_slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    fn publish(&self, mem: &GuestMemory) {
        mem.write_obj(self.avail_idx, GuestAddress(RINGS + 0x1002))
            .unwrap();
    }
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    len: u64,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// (user, system) CPU time of the calling thread.
fn cpu_time() -> (Duration, Duration) {
    // SAFETY: rusage is plain old data; all-zeroes is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into `ru`, which we own; RUSAGE_THREAD covers only
    // this (the benchmark) thread.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// CPU time spent inside `f` (the device side only, not the in-process driver).
fn device_cpu<T>(acc: &mut (Duration, Duration), f: impl FnOnce() -> T) -> T {
    let (u0, s0) = cpu_time();
    let out = f();
    let (u1, s1) = cpu_time();
    acc.0 += u1.saturating_sub(u0);
    acc.1 += s1.saturating_sub(s0);
    out
}

struct Row {
    requests: u64,
    bytes: u64,
    wall: Duration,
    /// Device-side (user, system) CPU time.
    cpu: (Duration, Duration),
}

fn print(name: &str, r: &Row) {
    let secs = r.wall.as_secs_f64();
    let per_req = |d: Duration| d.as_secs_f64() * 1e6 / r.requests as f64;
    println!(
        "{:<28} {:>10.0} {:>10.1} {:>10.2} {:>10.2}",
        name,
        r.requests as f64 / secs,
        r.bytes as f64 / secs / (1 << 20) as f64,
        per_req(r.cpu.0),
        per_req(r.cpu.1),
    );
}

fn make_disk() -> Disk {
    let mut file = tempfile::tempfile().unwrap();
    // Real data, so reads come from the page cache rather than from holes.
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..DISK_BYTES >> 20 {
        file.write_all(&chunk).unwrap();
    }
    disk_from_file(file, false, "bench").unwrap()
}

fn next_sector(w: Workload, rng: &mut Rng, cursor: &mut u64) -> u64 {
    let sectors = w.len / 512;
    let slots = DISK_BYTES / w.len;
    if w.random {
        (rng.next() % slots) * sectors
    } else {
        *cursor = (*cursor + 1) % slots;
        *cursor * sectors
    }
}

/// The request path alone: batches of DEPTH requests through `process_queue`.
fn bench_handler(w: Workload, disk: &Disk, mem: &GuestMemory, secs: f64) -> Row {
    let mut queue = Driver::queue();
    let mut driver = Driver { avail_idx: 0 };
    let mut rng = Rng(0x1234_5678);
    let mut cursor = 0;
    let (mut requests, start) = (0u64, Instant::now());
    let mut cpu = (Duration::ZERO, Duration::ZERO);
    while start.elapsed().as_secs_f64() < secs {
        for slot in 0..DEPTH {
            let sector = next_sector(w, &mut rng, &mut cursor);
            driver.add(mem, slot, w.write, sector, w.len);
        }
        driver.publish(mem);
        let run = device_cpu(&mut cpu, || process_queue(&mut queue, mem, disk).unwrap());
        assert_eq!(u64::from(run.completed), DEPTH);
        requests += DEPTH;
    }
    Row {
        requests,
        bytes: requests * w.len,
        wall: start.elapsed(),
        cpu,
    }
}

/// The whole device: queue notification eventfd, event loop, interrupt.
fn bench_device(w: Workload, mem: &GuestMemory, secs: f64) -> Row {
    let block = Arc::new(Mutex::new(Block::from_disk(make_disk()).unwrap()));
    let mut manager = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
    manager.add_subscriber(block.clone());
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let line = Arc::new(CountingLine(AtomicUsize::new(0)));
    block
        .lock()
        .unwrap()
        .activate(ActivationContext {
            mem: mem.clone(),
            acked_features: 0,
            queues: vec![Driver::queue()],
            queue_events: vec![notify.try_clone().unwrap()],
            interrupt: Arc::new(VirtioInterrupt::new(line.clone())),
        })
        .unwrap();
    manager.run().unwrap();
    let mut driver = Driver { avail_idx: 0 };
    let mut rng = Rng(0x1234_5678);
    let mut cursor = 0;
    let (mut requests, start) = (0u64, Instant::now());
    let mut cpu = (Duration::ZERO, Duration::ZERO);
    while start.elapsed().as_secs_f64() < secs {
        for slot in 0..DEPTH {
            let sector = next_sector(w, &mut rng, &mut cursor);
            driver.add(mem, slot, w.write, sector, w.len);
        }
        driver.publish(mem);
        notify.write(1).unwrap();
        device_cpu(&mut cpu, || manager.run().unwrap());
        requests += DEPTH;
    }
    let used: u16 = mem.read_obj(GuestAddress(RINGS + 0x2002)).unwrap();
    assert_eq!(used, driver.avail_idx, "every request completed");
    assert!(line.0.load(Ordering::SeqCst) > 0);
    Row {
        requests,
        bytes: requests * w.len,
        wall: start.elapsed(),
        cpu,
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not want a long run.
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if std::env::args().any(|a| a == "--bench") {
            2.0
        } else {
            0.05
        });
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap();
    let disk = make_disk();
    let workloads = [
        Workload {
            name: "4k-randread",
            write: false,
            random: true,
            len: 4096,
        },
        Workload {
            name: "4k-randwrite",
            write: true,
            random: true,
            len: 4096,
        },
        Workload {
            name: "1m-seqread",
            write: false,
            random: false,
            len: 1 << 20,
        },
        Workload {
            name: "1m-seqwrite",
            write: true,
            random: false,
            len: 1 << 20,
        },
    ];
    println!(
        "virtio-blk, queue depth {DEPTH}, {} MiB page-cached file, {secs} s per row",
        DISK_BYTES >> 20
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>10}",
        "workload", "req/s", "MiB/s", "usr us/req", "sys us/req"
    );
    for w in workloads {
        print(
            &format!("handler {}", w.name),
            &bench_handler(w, &disk, &mem, secs),
        );
    }
    for w in [workloads[0], workloads[2]] {
        print(
            &format!("device+eventloop {}", w.name),
            &bench_device(w, &mem, secs),
        );
    }
}
