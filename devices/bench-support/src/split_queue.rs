//! The driver's side of a split virtqueue in mock guest memory: writes descriptors, publishes
//! them in the available ring, and reaps the used ring, as a guest driver would.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::BenchError;
use devices::GuestMemory;

const DESC_LEN: u64 = 16;
const PAGE: u64 = 4096;

/// Where a queue's three parts live in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    pub desc_table: GuestAddress,
    pub avail_ring: GuestAddress,
    pub used_ring: GuestAddress,
    pub size: u16,
}

impl RingLayout {
    /// The three parts page-aligned one after the other from `base`.
    pub fn packed(base: GuestAddress, size: u16) -> Self {
        let n = u64::from(size);
        let desc_bytes = round_up(DESC_LEN * n);
        let avail_bytes = round_up(6 + 2 * n);
        Self {
            desc_table: base,
            avail_ring: base.unchecked_add(desc_bytes),
            used_ring: base.unchecked_add(desc_bytes + avail_bytes),
            size,
        }
    }

    /// Bytes from `desc_table` to the end of the used ring (for `packed` layouts).
    pub fn span(&self) -> u64 {
        let used_bytes = 6 + 8 * u64::from(self.size);
        self.used_ring.0 + used_bytes - self.desc_table.0
    }
}

fn round_up(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE) * PAGE
}

/// One descriptor as the driver writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescSpec {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl DescSpec {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&self.addr.to_le_bytes());
        d[8..12].copy_from_slice(&self.len.to_le_bytes());
        d[12..14].copy_from_slice(&self.flags.to_le_bytes());
        d[14..16].copy_from_slice(&self.next.to_le_bytes());
        d
    }
}

/// A completed chain taken from the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u16,
    pub len: u32,
}

pub struct DriverQueue {
    mem: GuestMemory,
    layout: RingLayout,
    /// Next available-ring index to fill (published by `publish`).
    avail_idx: u16,
    /// Next used-ring index to reap.
    last_used: u16,
}

impl DriverQueue {
    /// Zeroes the rings and returns a driver with nothing queued.
    pub fn new(mem: &GuestMemory, layout: RingLayout) -> Result<Self, BenchError> {
        if layout.size == 0 || !layout.size.is_power_of_two() {
            return Err(BenchError::Setup {
                what: "split queue",
                why: format!("queue size {} is not a power of two", layout.size),
            });
        }
        let zeroes = vec![0u8; usize::try_from(layout.span()).map_err(BenchError::memory)?];
        mem.write_slice(&zeroes, layout.desc_table)
            .map_err(BenchError::memory)?;
        Ok(Self {
            mem: mem.clone(),
            layout,
            avail_idx: 0,
            last_used: 0,
        })
    }

    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The device's view of this queue, configured as the transport would hand it over.
    pub fn device_queue(&self, event_idx: bool) -> Result<Queue, BenchError> {
        let mut q = Queue::new(self.layout.size)?;
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        let (lo, hi) = split(self.layout.desc_table);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.layout.avail_ring);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.layout.used_ring);
        q.set_used_ring_address(lo, hi);
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(&self.mem) {
            return Err(BenchError::Setup {
                what: "split queue",
                why: "rings are not inside guest memory".into(),
            });
        }
        Ok(q)
    }

    /// Writes descriptor `index` of the queue's descriptor table.
    pub fn set_desc(&self, index: u16, desc: DescSpec) -> Result<(), BenchError> {
        let at = self
            .layout
            .desc_table
            .unchecked_add(DESC_LEN * u64::from(index % self.layout.size));
        write_descs(&self.mem, at, &[desc])
    }

    /// Puts chain `head` in the next available-ring slot; the device sees it after `publish`.
    pub fn make_available(&mut self, head: u16) -> Result<(), BenchError> {
        let slot = self
            .layout
            .avail_ring
            .unchecked_add(4 + 2 * u64::from(self.avail_idx % self.layout.size));
        self.mem
            .write_obj(head.to_le(), slot)
            .map_err(BenchError::memory)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Makes every chain added since the last call visible to the device.
    pub fn publish(&self) -> Result<(), BenchError> {
        // The ring entries must be visible before the index that covers them.
        fence(Ordering::Release);
        self.mem
            .write_obj(
                self.avail_idx.to_le(),
                self.layout.avail_ring.unchecked_add(2),
            )
            .map_err(BenchError::memory)
    }

    /// Chains made available so far (published or not).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Chains made available and not yet reaped.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// The device's used index.
    pub fn used_idx(&self) -> Result<u16, BenchError> {
        let idx: u16 = self
            .mem
            .read_obj(self.layout.used_ring.unchecked_add(2))
            .map_err(BenchError::memory)?;
        fence(Ordering::Acquire);
        Ok(u16::from_le(idx))
    }

    /// The next completed chain, if the device returned one since the last call.
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>, BenchError> {
        if self.used_idx()? == self.last_used {
            return Ok(None);
        }
        let at = self
            .layout
            .used_ring
            .unchecked_add(4 + 8 * u64::from(self.last_used % self.layout.size));
        let id: u32 = self.mem.read_obj(at).map_err(BenchError::memory)?;
        let len: u32 = self
            .mem
            .read_obj(at.unchecked_add(4))
            .map_err(BenchError::memory)?;
        self.last_used = self.last_used.wrapping_add(1);
        let id = u16::try_from(u32::from_le(id))
            .map_err(|_| BenchError::Check(format!("used ring id {id} is not a u16")))?;
        Ok(Some(UsedElem {
            id,
            len: u32::from_le(len),
        }))
    }
}

/// Writes consecutive descriptors at `at` (a queue's table or an indirect table).
pub fn write_descs(
    mem: &GuestMemory,
    at: GuestAddress,
    descs: &[DescSpec],
) -> Result<(), BenchError> {
    let bytes: Vec<u8> = descs.iter().flat_map(|d| d.to_bytes()).collect();
    mem.write_slice(&bytes, at).map_err(BenchError::memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_round_trip_through_the_device_queue() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let layout = RingLayout::packed(GuestAddress(0x1000), 8);
        assert_eq!(layout.avail_ring, GuestAddress(0x2000));
        assert_eq!(layout.used_ring, GuestAddress(0x3000));
        let mut driver = DriverQueue::new(&mem, layout).unwrap();
        let mut queue = driver.device_queue(false).unwrap();
        for i in 0..3u16 {
            let desc = DescSpec {
                addr: 0x8000 + u64::from(i) * 0x100,
                len: 0x100,
                flags: 0,
                next: 0,
            };
            driver.set_desc(i, desc).unwrap();
            driver.make_available(i).unwrap();
        }
        assert!(
            queue.pop_descriptor_chain(&mem).is_none(),
            "nothing published yet"
        );
        driver.publish().unwrap();
        assert_eq!(driver.in_flight(), 3);
        let mut seen = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            assert_eq!(descs.len(), 1);
            assert_eq!(descs[0].addr().0, 0x8000 + u64::from(head) * 0x100);
            seen.push(head);
            queue.add_used(&mem, head, u32::from(head) * 10).unwrap();
        }
        assert_eq!(seen, vec![0, 1, 2]);
        for i in 0..3u16 {
            let used = driver.pop_used().unwrap().unwrap();
            assert_eq!(
                used,
                UsedElem {
                    id: i,
                    len: u32::from(i) * 10
                }
            );
        }
        assert!(driver.pop_used().unwrap().is_none());
        assert_eq!(driver.in_flight(), 0);
    }

    #[test]
    fn rejects_bad_sizes_and_memory() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        assert!(DriverQueue::new(&mem, RingLayout::packed(GuestAddress(0), 6)).is_err());
        assert!(DriverQueue::new(&mem, RingLayout::packed(GuestAddress(0x2000), 8)).is_err());
    }
}
