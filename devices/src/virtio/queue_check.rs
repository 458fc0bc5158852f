//! Popping descriptor chains with the ring's structure checked first.
//!
//! `virtio_queue` ends a descriptor chain silently when it loops, runs longer than the queue,
//! points at a descriptor index outside the table, or adds up to more than 4 GiB; and
//! `pop_descriptor_chain` hides an available index that ran more than a queue's worth ahead. A
//! device that went on would process a chain the driver never wrote. Such a ring is broken
//! beyond one request (virtio 1.2, 2.1.2: the device enters an error state that needs a reset),
//! so [`pop_checked`] reports it and the device then sets DEVICE_NEEDS_RESET
//! ([`super::VirtioInterrupt::signal_needs_reset`]) and stops processing until the driver resets
//! it. Problems inside one request (buffers outside guest memory, wrong direction, bad header)
//! stay per-request errors the device reports in its own way.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};

use crate::GuestMemory;

/// The next available chain, or None when the driver has offered nothing new.
///
/// Errors (the chain, if any, is consumed and not returned to the driver):
/// - `InvalidAvailRingIndex`: the available index is more than the queue size ahead;
/// - `InvalidDescriptorIndex`: the head index is outside the descriptor table, or the head
///   descriptor is unreadable;
/// - `InvalidChain`: the chain did not end (a loop, longer than the queue, a `next` outside the
///   table, an unusable indirect table, or more than 2^32 bytes in total).
pub fn pop_checked<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
) -> Result<Option<DescriptorChain<&'m GuestMemory>>, virtio_queue::Error> {
    let Some(chain) = queue.iter(mem)?.next() else {
        return Ok(None);
    };
    let mut count = 0u32;
    let mut last_has_next = false;
    for desc in chain.clone() {
        count = count.saturating_add(1);
        last_has_next = desc.has_next();
    }
    if count == 0 {
        return Err(virtio_queue::Error::InvalidDescriptorIndex);
    }
    // The iterator stops early (loop, ttl, bad index, length overflow) on a descriptor that
    // still says another one follows; a well-formed chain ends on one that does not.
    if last_has_next {
        return Err(virtio_queue::Error::InvalidChain);
    }
    Ok(Some(chain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// A queue of size 8 whose table holds `descs` and whose avail ring offers `heads`.
    fn queue_with(mem: &GuestMemory, descs: &[RawDescriptor], heads: &[u16]) -> Queue {
        let vq = MockSplitQueue::new(mem, 8);
        for (i, desc) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *desc).unwrap();
        }
        for (i, head) in heads.iter().enumerate() {
            vq.avail().ring().ref_at(i).unwrap().store(*head);
        }
        vq.avail().idx().store(heads.len() as u16);
        vq.create_queue().unwrap()
    }

    fn pop(mem: &GuestMemory, q: &mut Queue) -> Result<Vec<u64>, String> {
        match pop_checked(q, mem) {
            Ok(Some(chain)) => Ok(chain.map(|d| d.addr().0).collect()),
            Ok(None) => Ok(Vec::new()),
            Err(e) => Err(format!("{e:?}")),
        }
    }

    #[test]
    fn well_formed_chains_pass_and_an_empty_ring_is_none() {
        let mem = mem();
        let descs = [d(0x1000, 16, NEXT, 1), d(0x2000, 1, W, 0)];
        let mut q = queue_with(&mem, &descs, &[0, 1]);
        assert_eq!(pop(&mem, &mut q), Ok(vec![0x1000, 0x2000]));
        assert_eq!(pop(&mem, &mut q), Ok(vec![0x2000]));
        assert_eq!(pop(&mem, &mut q), Ok(vec![]));
    }

    #[test]
    fn loops_and_chains_longer_than_the_queue_are_invalid() {
        let mem = mem();
        let looped = [d(0x1000, 16, NEXT, 1), d(0x2000, 16, NEXT, 0)];
        let mut q = queue_with(&mem, &looped, &[0]);
        assert_eq!(pop(&mem, &mut q), Err("InvalidChain".into()));

        let all: Vec<RawDescriptor> = (0..8u16).map(|i| d(0x1000, 1, NEXT, (i + 1) % 8)).collect();
        let mut q = queue_with(&mem, &all, &[3]);
        assert_eq!(pop(&mem, &mut q), Err("InvalidChain".into()));
    }

    #[test]
    fn indices_outside_the_table_are_invalid() {
        let mem = mem();
        let mut q = queue_with(&mem, &[d(0x1000, 16, NEXT, 0xffff)], &[0]);
        assert_eq!(pop(&mem, &mut q), Err("InvalidChain".into()));
        let mut q = queue_with(&mem, &[d(0x1000, 16, 0, 0)], &[8]);
        assert_eq!(pop(&mem, &mut q), Err("InvalidDescriptorIndex".into()));
    }

    #[test]
    fn chains_over_4_gib_in_total_are_invalid() {
        let mem = mem();
        let descs = [
            d(0x1000, 0x8000_0000, NEXT, 1),
            d(0x2000, 0x8000_0000, 0, 0),
        ];
        let mut q = queue_with(&mem, &descs, &[0]);
        assert_eq!(pop(&mem, &mut q), Err("InvalidChain".into()));
        // One descriptor of u32::MAX bytes is a (bad) request, not a broken ring.
        let mut q = queue_with(&mem, &[d(0x1000, u32::MAX, 0, 0)], &[0]);
        assert_eq!(pop(&mem, &mut q), Ok(vec![0x1000]));
    }

    #[test]
    fn an_available_index_too_far_ahead_is_invalid() {
        let mem = mem();
        let mut q = queue_with(&mem, &[d(0x1000, 16, 0, 0)], &[0]);
        let avail_idx = q.state().avail_ring + 2;
        mem.write_obj(100u16, GuestAddress(avail_idx)).unwrap();
        assert_eq!(pop(&mem, &mut q), Err("InvalidAvailRingIndex".into()));
    }

    #[test]
    fn an_unusable_indirect_table_is_invalid() {
        let mem = mem();
        // Not a multiple of the descriptor size.
        let descs = [d(0x4000, 17, VRING_DESC_F_INDIRECT as u16, 0)];
        let mut q = queue_with(&mem, &descs, &[0]);
        assert_eq!(pop(&mem, &mut q), Err("InvalidDescriptorIndex".into()));
        // A loop inside the indirect table.
        mem.write_obj(d(0x1000, 1, NEXT, 1), GuestAddress(0x4000))
            .unwrap();
        mem.write_obj(d(0x1000, 1, NEXT, 0), GuestAddress(0x4010))
            .unwrap();
        let descs = [d(0x4000, 32, VRING_DESC_F_INDIRECT as u16, 0)];
        let mut q = queue_with(&mem, &descs, &[0]);
        assert_eq!(pop(&mem, &mut q), Err("InvalidChain".into()));
    }
}
