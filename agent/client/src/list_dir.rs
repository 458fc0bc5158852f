//! `ListDir` decoded with an entry cap.
//!
//! The reply is one message with a repeated `FileInfo`. An empty entry is 2 bytes on the wire
//! but a ~90-byte `FileInfo` in memory, so a byte cap alone lets a few MiB of reply become
//! hundreds of MiB of entries. This decoder counts entries as it goes and stops at the cap
//! before decoding (allocating) more.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prost::bytes::Buf;
use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

use crate::proto::{FileInfo, ListDirRequest, ListDirResponse};

/// gRPC path of the call (as the generated client spells it).
pub(crate) const PATH: &str = "/dormouse.agent.v1.Agent/ListDir";

/// Codec for one `ListDir` call; [`ListDirCodec::exceeded`] tells whether the cap stopped it.
#[derive(Debug, Clone)]
pub(crate) struct ListDirCodec {
    max_entries: usize,
    /// Entries seen when the cap was crossed (0 = not crossed).
    exceeded: Arc<AtomicUsize>,
}

impl ListDirCodec {
    pub fn new(max_entries: usize) -> Self {
        Self {
            max_entries,
            exceeded: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// `Some(entries seen)` when the reply had more entries than allowed.
    pub fn exceeded(&self) -> Option<usize> {
        match self.exceeded.load(Ordering::Acquire) {
            0 => None,
            seen => Some(seen),
        }
    }
}

impl Codec for ListDirCodec {
    type Encode = ListDirRequest;
    type Decode = ListDirResponse;
    type Encoder = ProstEncoder<ListDirRequest>;
    type Decoder = ListDirDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ListDirDecoder {
            max_entries: self.max_entries,
            exceeded: Arc::clone(&self.exceeded),
        }
    }
}

#[derive(Debug)]
pub(crate) struct ListDirDecoder {
    max_entries: usize,
    exceeded: Arc<AtomicUsize>,
}

impl Decoder for ListDirDecoder {
    type Item = ListDirResponse;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<ListDirResponse>, Status> {
        decode_limited(buf, self.max_entries)
            .map(Some)
            .map_err(|error| match error {
                LimitedError::TooMany(seen) => {
                    self.exceeded.store(seen, Ordering::Release);
                    Status::resource_exhausted("too many directory entries")
                }
                LimitedError::BadLength => {
                    Status::internal("bad ListDir reply: entry longer than the message")
                }
                LimitedError::Decode(e) => Status::internal(format!("bad ListDir reply: {e}")),
            })
    }
}

#[derive(Debug)]
pub(crate) enum LimitedError {
    TooMany(usize),
    /// An entry claims more bytes than the message holds.
    BadLength,
    Decode(prost::DecodeError),
}

impl From<prost::DecodeError> for LimitedError {
    fn from(e: prost::DecodeError) -> Self {
        Self::Decode(e)
    }
}

/// Decodes a `ListDirResponse`, failing on entry `max_entries + 1` before decoding it.
pub(crate) fn decode_limited(
    buf: &mut impl Buf,
    max_entries: usize,
) -> Result<ListDirResponse, LimitedError> {
    let mut entries = Vec::new();
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(buf)?;
        // Field 1: `repeated FileInfo entries`.
        if tag == 1 && wire_type == WireType::LengthDelimited {
            if entries.len() >= max_entries {
                return Err(LimitedError::TooMany(entries.len().saturating_add(1)));
            }
            let len = decode_varint(buf)?;
            let len = usize::try_from(len)
                .ok()
                .filter(|&len| len <= buf.remaining())
                .ok_or(LimitedError::BadLength)?;
            entries.push(FileInfo::decode(buf.take(len))?);
        } else {
            skip_field(wire_type, tag, buf, DecodeContext::default())?;
        }
    }
    Ok(ListDirResponse { entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(entries: usize) -> Vec<u8> {
        ListDirResponse {
            entries: (0..entries)
                .map(|i| FileInfo {
                    name: format!("f{i}"),
                    size: i as u64,
                    ..FileInfo::default()
                })
                .collect(),
        }
        .encode_to_vec()
    }

    #[test]
    fn decodes_like_prost_within_the_cap() {
        let bytes = encoded(3);
        let mut buf = &bytes[..];
        let decoded = decode_limited(&mut buf, 3).unwrap();
        assert_eq!(decoded, ListDirResponse::decode(&bytes[..]).unwrap());
        assert_eq!(decoded.entries[2].name, "f2");
        assert_eq!(decoded.entries[2].size, 2);
    }

    #[test]
    fn stops_at_the_cap() {
        let bytes = encoded(5);
        let mut buf = &bytes[..];
        assert!(matches!(
            decode_limited(&mut buf, 4),
            Err(LimitedError::TooMany(5))
        ));
    }

    #[test]
    fn empty_entries_are_counted_too() {
        // A million 2-byte empty entries: the amplification this decoder exists for.
        let bytes: Vec<u8> = [0x0a, 0x00].repeat(1_000_000);
        let mut buf = &bytes[..];
        assert!(matches!(
            decode_limited(&mut buf, 1000),
            Err(LimitedError::TooMany(1001))
        ));
    }

    #[test]
    fn unknown_fields_are_skipped_and_lies_refused() {
        // Field 2 (unknown) varint, then one entry.
        let mut bytes = vec![0x10, 0x05];
        bytes.extend(encoded(1));
        let mut buf = &bytes[..];
        assert_eq!(decode_limited(&mut buf, 10).unwrap().entries.len(), 1);
        // An entry claiming more bytes than the message has.
        let mut buf = &[0x0a, 0x7f, 0x00][..];
        assert!(matches!(
            decode_limited(&mut buf, 10),
            Err(LimitedError::BadLength)
        ));
    }
}
