//! virtio-net TX and RX processing with arbitrary descriptor chains on both queues and a fake
//! TAP that hands out fuzzed frames (any length, including empty and oversized) and fuzzed
//! errors, over several rounds that share RX state (a frame held back for lack of buffers).

#![no_main]

use std::collections::VecDeque;
use std::io;

use devices::virtio::net::{process_rx, process_tx, RxBuffer, TapIo, MAX_FRAME_LEN, VNET_HDR_LEN};
use devices_fuzz::{fill_data, fuzzed_queue, guest_memory, Input};
use libfuzzer_sys::fuzz_target;

enum Read {
    Frame(Vec<u8>),
    Error(io::ErrorKind),
}

struct FakeTap {
    reads: VecDeque<Read>,
    refuse_writes: bool,
    written: Vec<usize>,
}

impl TapIo for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.reads.pop_front() {
            None => Err(io::ErrorKind::WouldBlock.into()),
            Some(Read::Error(kind)) => Err(kind.into()),
            Some(Read::Frame(f)) => {
                // A TAP truncates what does not fit the read buffer.
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
        }
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        assert!(frame.len() >= VNET_HDR_LEN && frame.len() <= MAX_FRAME_LEN);
        if self.refuse_writes {
            return Err(io::ErrorKind::Other.into());
        }
        self.written.push(frame.len());
        Ok(frame.len())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mem = guest_memory();
    let mut rx_queue = fuzzed_queue(&mut input, &mem, 0);
    let mut tx_queue = fuzzed_queue(&mut input, &mem, 1);
    let mut reads = VecDeque::new();
    for _ in 0..input.u8() % 8 {
        match input.u8() % 8 {
            0 => reads.push_back(Read::Error(io::ErrorKind::Interrupted)),
            1 => reads.push_back(Read::Error(io::ErrorKind::Other)),
            2 => reads.push_back(Read::Frame(vec![0x5a; MAX_FRAME_LEN + 100])),
            _ => {
                let len = usize::from(input.u16() % 2048);
                reads.push_back(Read::Frame(input.take(len).to_vec()));
            }
        }
    }
    let mut tap = FakeTap {
        reads,
        refuse_writes: input.bool(),
        written: Vec::new(),
    };
    fill_data(&mem, input.rest());

    let mut rx = RxBuffer::default();
    let mut scratch = Vec::new();
    for _ in 0..3 {
        if let Ok(run) = process_tx(&mut tx_queue, &mem, &mut tap, &mut scratch) {
            assert_eq!(run.sent as usize, tap.written.len().min(run.sent as usize));
        }
        if let Ok(run) = process_rx(&mut rx_queue, &mem, &mut tap, &mut rx) {
            // Blocked means a frame is held for the next round.
            assert!(!run.blocked || rx.has_pending());
        }
    }
});
