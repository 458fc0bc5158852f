//! virtio-net frame path cost (RX and TX through `process_rx` / `process_tx`) with an in-memory
//! TAP: what the VMM spends per frame, without the host network stack. Throughput through a
//! real TAP needs root and a network namespace and is not measured here.
//!
//! `cargo bench -p devices --bench virtio_net` (BENCH_SECS=n per row, default 2).

use std::io;
use std::time::{Duration, Instant};

use devices::virtio::net::{process_rx, process_tx, RxBuffer, TapIo, MAX_FRAME_LEN};
use devices::GuestMemory;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 256;
const BATCH: u16 = 128;
const MEM_BYTES: usize = 64 << 20;
const BUFS: u64 = 0x10_0000;
const BUF_LEN: u64 = 0x1_1000; // room for a 64 KiB GSO frame and its header

/// Hands out `remaining` copies of one frame, then WouldBlock; swallows writes.
struct MemTap {
    frame: Vec<u8>,
    remaining: u32,
    written: u64,
}

impl TapIo for MemTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.remaining -= 1;
        let n = self.frame.len().min(buf.len());
        buf[..n].copy_from_slice(&self.frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.written += frame.len() as u64;
        Ok(frame.len())
    }
}

struct Driver {
    avail_idx: u16,
}

impl Driver {
    fn queue() -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(0x1000), Some(0));
        q.set_used_ring_address(Some(0x2000), Some(0));
        q.set_event_idx(true);
        q.set_ready(true);
        q
    }

    /// Posts BATCH single-descriptor chains of `len` bytes.
    fn post(&mut self, mem: &GuestMemory, len: u32, writable: bool) {
        let flags: u16 = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        for i in 0..BATCH {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&(BUFS + u64::from(i) * BUF_LEN).to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&d, GuestAddress(16 * u64::from(i)))
                .unwrap();
            let slot = 0x1000 + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
            mem.write_obj(i, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        mem.write_obj(self.avail_idx, GuestAddress(0x1002)).unwrap();
    }
}

fn cpu_time() -> Duration {
    // SAFETY: rusage is plain old data; all-zeroes is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into `ru`, which we own.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn run(name: &str, mem: &GuestMemory, frame_len: usize, rx: bool, secs: f64) {
    let mut queue = Driver::queue();
    let mut driver = Driver { avail_idx: 0 };
    let mut tap = MemTap {
        frame: vec![0xab; frame_len],
        remaining: 0,
        written: 0,
    };
    let mut rx_buf = RxBuffer::default();
    let mut scratch = Vec::with_capacity(MAX_FRAME_LEN);
    let (mut frames, mut cpu, start) = (0u64, Duration::ZERO, Instant::now());
    while start.elapsed().as_secs_f64() < secs {
        let moved = if rx {
            driver.post(mem, BUF_LEN as u32, true);
            tap.remaining = u32::from(BATCH);
            let c0 = cpu_time();
            let run = process_rx(&mut queue, mem, &mut tap, &mut rx_buf).unwrap();
            cpu += cpu_time() - c0;
            run.delivered
        } else {
            driver.post(mem, frame_len as u32, false);
            let c0 = cpu_time();
            let run = process_tx(&mut queue, mem, &mut tap, &mut scratch).unwrap();
            cpu += cpu_time() - c0;
            run.sent
        };
        assert_eq!(moved, u32::from(BATCH));
        frames += u64::from(moved);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:<16} {:>8} {:>12.0} {:>10.1} {:>12.2}",
        name,
        frame_len,
        frames as f64 / secs,
        (frames * frame_len as u64) as f64 / secs / (1 << 20) as f64,
        cpu.as_secs_f64() * 1e6 / frames as f64,
    );
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if std::env::args().any(|a| a == "--bench") {
            2.0
        } else {
            0.05
        });
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).unwrap();
    println!("virtio-net frame path with an in-memory TAP, batches of {BATCH}, {secs} s per row");
    println!(
        "{:<16} {:>8} {:>12} {:>10} {:>12}",
        "path", "bytes", "frames/s", "MiB/s", "CPU us/frame"
    );
    for len in [64 + 12, 1514 + 12, 65536 + 12] {
        run("rx", &mem, len, true, secs);
        run("tx", &mem, len, false, secs);
    }
}
