//! virtio-balloon's queue parsers with arbitrary rings: inflate/deflate PFN arrays, free page
//! reports and statistics buffers, each chain parsed as the input chooses. Every range handed
//! on must be page-aligned, non-empty and inside guest memory (the device releases host memory
//! behind it), and a statistics buffer yields at most `MAX_STATS` entries.

#![no_main]

use devices::virtio::balloon::queues::MAX_STATS;
use devices::virtio::balloon::{pfn_ranges, reported_ranges, stats, PageRange, PAGE_SIZE};
use devices::virtio::queue_check::pop_checked;
use devices_fuzz::{fill_data, fuzzed_queue, guest_memory, Input};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryBackend};

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mem = guest_memory();
    let mut queue = fuzzed_queue(&mut input, &mem, 0);
    let kinds: Vec<u8> = (0..8).map(|_| input.u8()).collect();
    fill_data(&mem, input.rest());
    let check = |range: PageRange| {
        assert!(range.len > 0 && range.gpa % PAGE_SIZE == 0 && range.len % PAGE_SIZE == 0);
        assert!(mem.check_range(GuestAddress(range.gpa), range.len as usize));
    };
    for kind in kinds {
        let chain = match pop_checked(&mut queue, &mem) {
            Ok(Some(chain)) => chain,
            _ => break,
        };
        match kind % 3 {
            0 => {
                pfn_ranges(&mem, chain, &mut |r| check(r));
            }
            1 => {
                reported_ranges(&mem, chain, &mut |r| check(r));
            }
            _ => {
                let (got, _) = stats(&mem, chain);
                assert!(got.len() <= MAX_STATS);
            }
        }
    }
});
