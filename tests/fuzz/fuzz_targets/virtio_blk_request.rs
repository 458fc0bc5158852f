//! virtio-blk request parsing and execution over arbitrary descriptor tables, available rings
//! and payloads, against an in-memory disk of fuzzed size (possibly not sector-aligned, possibly
//! read-only): `process_queue`, which runs `process_request` on every chain.

#![no_main]

use devices::virtio::block::process_queue;
use devices_fuzz::{fill_data, fuzzed_queue, guest_memory, memfd_disk, ring_base, Input};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let disk_len = u64::from(input.u16() % 0x4000) * 8 + u64::from(input.u8() % 3) * 100;
    let read_only = input.bool();
    let disk = memfd_disk(disk_len, read_only);
    let mem = guest_memory();
    let mut queue = fuzzed_queue(&mut input, &mem, 0);
    fill_data(&mem, input.rest());

    if let Ok(run) = process_queue(&mut queue, &mem, &disk) {
        if run.completed > 0 {
            // The device published every completion it counted.
            let used_idx: u16 = mem
                .read_obj(GuestAddress(ring_base(0) + 0x2000 + 2))
                .expect("used ring is in guest memory");
            assert_eq!(used_idx, queue.next_used());
        }
    }
    // Requests stay inside the capacity the guest was told about: the file never grows.
    let len = disk.file.metadata().map(|m| m.len()).unwrap_or(0);
    assert_eq!(len, disk_len, "the disk file changed size");
});
