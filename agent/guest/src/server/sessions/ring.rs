//! Bounded, ordered output of one session: stdout and stderr chunks in the order the process
//! wrote them, each stream capped at its own byte budget (oldest bytes dropped first).

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One piece of output; `offset` counts the stream's bytes before `data`, `seq` orders chunks
/// of both streams (the first chunk ever pushed is 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub stream: Stream,
    pub seq: u64,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The output of both streams, each in its own queue (so trimming one is cheap), merged by
/// sequence number when read.
#[derive(Debug)]
pub struct OutputRing {
    streams: [VecDeque<Chunk>; 2],
    next_seq: u64,
    cap_per_stream: usize,
    /// Bytes held, and bytes ever written, per stream (stdout, stderr).
    held: [usize; 2],
    written: [u64; 2],
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl OutputRing {
    pub fn new(cap_per_stream: usize) -> Self {
        Self {
            streams: [VecDeque::new(), VecDeque::new()],
            next_seq: 0,
            cap_per_stream,
            held: [0; 2],
            written: [0; 2],
        }
    }

    /// Appends `data`, then drops the stream's oldest bytes beyond its cap.
    pub fn push(&mut self, stream: Stream, mut data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        // Pipe reads allocate a full chunk; the budget counts bytes, so memory must too.
        data.shrink_to_fit();
        let slot = index(stream);
        let offset = self.written[slot];
        self.written[slot] = offset.saturating_add(data.len() as u64);
        self.held[slot] = self.held[slot].saturating_add(data.len());
        let seq = self.next_seq;
        self.next_seq = seq.saturating_add(1);
        let queue = &mut self.streams[slot];
        queue.push_back(Chunk {
            stream,
            seq,
            offset,
            data,
        });
        while self.held[slot] > self.cap_per_stream {
            let excess = self.held[slot] - self.cap_per_stream;
            let Some(oldest) = queue.front_mut() else {
                break;
            };
            if oldest.data.len() > excess {
                // Keep the chunk's newest bytes.
                oldest.data.drain(..excess);
                oldest.data.shrink_to_fit();
                oldest.offset = oldest.offset.saturating_add(excess as u64);
                self.held[slot] -= excess;
            } else {
                self.held[slot] -= oldest.data.len();
                queue.pop_front();
            }
        }
    }

    /// Up to `max` chunks with sequence numbers from `from` on, in write order, and the
    /// sequence number to continue from. Chunks dropped meanwhile are skipped (their offsets
    /// show the gap).
    pub fn read_from(&self, from: u64, max: usize) -> (Vec<Chunk>, u64) {
        let [stdout, stderr] = &self.streams;
        let mut out_at = stdout.partition_point(|chunk| chunk.seq < from);
        let mut err_at = stderr.partition_point(|chunk| chunk.seq < from);
        let mut chunks = Vec::new();
        while chunks.len() < max {
            let next = match (stdout.get(out_at), stderr.get(err_at)) {
                (Some(out), Some(err)) if out.seq < err.seq => {
                    out_at += 1;
                    out
                }
                (_, Some(err)) => {
                    err_at += 1;
                    err
                }
                (Some(out), None) => {
                    out_at += 1;
                    out
                }
                (None, None) => break,
            };
            chunks.push(next.clone());
        }
        let resume = match chunks.last() {
            Some(last) if chunks.len() >= max => last.seq.saturating_add(1),
            // Everything up to now was read.
            _ => self.next_seq,
        };
        (chunks, resume)
    }

    /// Bytes currently held for `stream`.
    #[cfg(test)]
    pub fn held(&self, stream: Stream) -> usize {
        self.held[index(stream)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(chunks: &[Chunk], stream: Stream) -> Vec<u8> {
        chunks
            .iter()
            .filter(|c| c.stream == stream)
            .flat_map(|c| c.data.clone())
            .collect()
    }

    #[test]
    fn keeps_order_across_streams() {
        let mut ring = OutputRing::new(100);
        ring.push(Stream::Stdout, b"a".to_vec());
        ring.push(Stream::Stderr, b"b".to_vec());
        ring.push(Stream::Stdout, b"c".to_vec());
        let (chunks, next) = ring.read_from(0, 10);
        let order: Vec<_> = chunks.iter().map(|c| (c.stream, c.data.clone())).collect();
        assert_eq!(
            order,
            [
                (Stream::Stdout, b"a".to_vec()),
                (Stream::Stderr, b"b".to_vec()),
                (Stream::Stdout, b"c".to_vec())
            ]
        );
        assert_eq!(next, 3);
        assert_eq!(chunks[2].offset, 1);
        assert!(ring.read_from(next, 10).0.is_empty());
    }

    #[test]
    fn each_stream_is_capped_oldest_bytes_first() {
        let mut ring = OutputRing::new(4);
        ring.push(Stream::Stdout, b"012".to_vec());
        ring.push(Stream::Stderr, b"xy".to_vec());
        ring.push(Stream::Stdout, b"345".to_vec());
        assert_eq!(ring.held(Stream::Stdout), 4);
        assert_eq!(ring.held(Stream::Stderr), 2);
        let (chunks, _) = ring.read_from(0, 10);
        assert_eq!(text(&chunks, Stream::Stdout), b"2345");
        assert_eq!(text(&chunks, Stream::Stderr), b"xy");
        // The surviving part of the first chunk says where it starts.
        assert_eq!(chunks[0].offset, 2);

        // A chunk bigger than the cap keeps its tail; stderr is untouched.
        ring.push(Stream::Stdout, b"abcdefgh".to_vec());
        let (chunks, _) = ring.read_from(0, 10);
        assert_eq!(text(&chunks, Stream::Stdout), b"efgh");
        assert_eq!(text(&chunks, Stream::Stderr), b"xy");
        let last = chunks.last().unwrap();
        assert_eq!(last.offset, 10);
    }

    #[test]
    fn readers_behind_the_ring_resume_at_the_oldest_chunk() {
        let mut ring = OutputRing::new(2);
        for byte in b"abcdef" {
            ring.push(Stream::Stdout, vec![*byte]);
        }
        let (chunks, next) = ring.read_from(0, 10);
        assert_eq!(text(&chunks, Stream::Stdout), b"ef");
        assert_eq!(chunks[0].offset, 4, "the gap is visible in the offset");
        assert_eq!(next, 6);
        // Reading in small batches continues where the previous one stopped.
        let (first, next) = ring.read_from(0, 1);
        assert_eq!(first[0].data, b"e");
        let (second, _) = ring.read_from(next, 1);
        assert_eq!(second[0].data, b"f");
    }
}
