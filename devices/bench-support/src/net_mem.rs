//! virtio-net frame path cost with an in-memory TAP: `process_rx` / `process_tx` on batches of
//! single-buffer chains, so the figure is the device code alone, without any network stack.
//! (`net_tap` measures the same device through a real TAP.)

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::GuestAddress;

use crate::split_queue::{DescSpec, DriverQueue, RingLayout};
use crate::{BenchError, CpuMeter, IoFigure};
use devices::virtio::net::{process_rx, process_tx, RxBuffer, TapIo, TapOffload, MAX_FRAME_LEN};
use devices::GuestMemory;

const QUEUE_SIZE: u16 = devices::virtio::net::QUEUE_SIZE;
/// Chains posted per device run.
pub const BATCH: u16 = 128;
const MEM_BYTES: usize = 16 << 20;
const BUFS: u64 = 0x10_0000;
/// Room for a 64 KiB GSO frame and its header.
const BUF_LEN: u64 = 0x1_1000;

/// Direction of a net row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetPath {
    /// TAP → device → guest RX buffers.
    Rx,
    /// Guest TX buffers → device → TAP.
    Tx,
}

impl NetPath {
    pub fn name(self) -> &'static str {
        match self {
            NetPath::Rx => "rx",
            NetPath::Tx => "tx",
        }
    }
}

/// Hands out `remaining` copies of one frame, then WouldBlock; counts what is written to it.
pub struct MemTap {
    frame: Vec<u8>,
    remaining: u32,
    pub written_frames: u64,
    pub written_bytes: u64,
}

impl MemTap {
    pub fn new(frame: Vec<u8>) -> Self {
        Self {
            frame,
            remaining: 0,
            written_frames: 0,
            written_bytes: 0,
        }
    }

    /// Queues `n` more copies of the frame for reading.
    pub fn queue_frames(&mut self, n: u32) {
        self.remaining = self.remaining.saturating_add(n);
    }
}

impl TapIo for MemTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.remaining -= 1;
        let n = self.frame.len().min(buf.len());
        let (dst, src) = (buf.get_mut(..n), self.frame.get(..n));
        if let (Some(dst), Some(src)) = (dst, src) {
            dst.copy_from_slice(src);
        }
        Ok(n)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.written_frames += 1;
        self.written_bytes += frame.len() as u64;
        Ok(frame.len())
    }
}

impl TapOffload for MemTap {
    fn set_offload(&self, _flags: libc::c_uint) -> io::Result<()> {
        Ok(())
    }
}

/// Never readable: lets a `MemTap` stand in where the device wants an fd to poll.
impl AsRawFd for MemTap {
    fn as_raw_fd(&self) -> RawFd {
        -1
    }
}

/// Moves batches of `frame_len`-byte frames (virtio-net header included) along `path` for
/// `duration`.
pub fn run(path: NetPath, frame_len: usize, duration: Duration) -> Result<IoFigure, BenchError> {
    if !(devices::virtio::net::VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&frame_len) {
        return Err(BenchError::Setup {
            what: "net workload",
            why: format!("frame length {frame_len} outside 12..={MAX_FRAME_LEN}"),
        });
    }
    let mem =
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).map_err(BenchError::memory)?;
    let mut driver = DriverQueue::new(&mem, RingLayout::packed(GuestAddress(0), QUEUE_SIZE))?;
    let mut queue = driver.device_queue(true)?;
    let mut tap = MemTap::new(vec![0xab; frame_len]);
    let mut rx_buf = RxBuffer::default();
    let mut scratch = Vec::with_capacity(MAX_FRAME_LEN);
    let (desc_len, flags) = match path {
        NetPath::Rx => (BUF_LEN as u32, VRING_DESC_F_WRITE as u16),
        NetPath::Tx => (frame_len as u32, 0),
    };
    for i in 0..BATCH {
        let addr = BUFS + u64::from(i) * BUF_LEN;
        driver.set_desc(
            i,
            DescSpec {
                addr,
                len: desc_len,
                flags,
                next: 0,
            },
        )?;
    }
    let (mut meter, mut frames, start) = (CpuMeter::new(), 0u64, Instant::now());
    while start.elapsed() < duration {
        for i in 0..BATCH {
            driver.make_available(i)?;
        }
        driver.publish()?;
        let moved = match path {
            NetPath::Rx => {
                tap.queue_frames(u32::from(BATCH));
                meter
                    .measure(|| process_rx(&mut queue, &mem, &mut tap, &mut rx_buf))?
                    .delivered
            }
            NetPath::Tx => {
                meter
                    .measure(|| process_tx(&mut queue, &mem, &mut tap, &mut scratch))?
                    .sent
            }
        };
        let mut reaped = 0u16;
        while let Some(used) = driver.pop_used()? {
            let want = match path {
                NetPath::Rx => frame_len as u32,
                NetPath::Tx => 0,
            };
            if used.len != want {
                return Err(BenchError::Check(format!(
                    "used length {} for chain {}",
                    used.len, used.id
                )));
            }
            reaped += 1;
        }
        if moved != u32::from(BATCH) || reaped != BATCH {
            return Err(BenchError::Check(format!(
                "moved {moved}, reaped {reaped} of {BATCH}"
            )));
        }
        frames += u64::from(BATCH);
    }
    if path == NetPath::Tx && tap.written_frames != frames {
        return Err(BenchError::Check(format!(
            "{} of {frames} frames reached the TAP",
            tap.written_frames
        )));
    }
    Ok(IoFigure {
        ops: frames,
        bytes: frames * frame_len as u64,
        wall: start.elapsed(),
        cpu: meter.total(),
        lost: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_paths_move_whole_batches() {
        for path in [NetPath::Rx, NetPath::Tx] {
            for len in [76, 1526, 65548] {
                let f = run(path, len, Duration::from_millis(2)).unwrap();
                assert!(f.ops >= u64::from(BATCH), "{path:?} {len}: {f:?}");
                assert_eq!(f.bytes, f.ops * len as u64);
            }
        }
        assert!(run(NetPath::Tx, 4, Duration::ZERO).is_err());
    }
}
