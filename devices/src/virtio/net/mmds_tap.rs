//! The TAP as the queues see it when the interface serves the MMDS: guest frames for the MMDS go
//! to the responder instead of the TAP, and the responder's replies are read before the TAP's
//! frames.

use std::io;

use super::rxtx::TapIo;
use super::VNET_HDR_LEN;
use crate::mmds::intercept::is_for_mmds;
use crate::mmds::Responder;

pub(super) struct MmdsTap<'a, B> {
    pub backend: &'a mut B,
    pub responder: Option<&'a mut Responder>,
}

impl<B: TapIo> TapIo for MmdsTap<'_, B> {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(responder) = self.responder.as_deref_mut() {
            while let Some(frame) = responder.pop_frame() {
                let len = VNET_HDR_LEN + frame.len();
                let Some(out) = buf.get_mut(..len) else {
                    continue;
                };
                // No offloads: flags, GSO type, lengths and csum fields zero; num_buffers 1.
                out.fill(0);
                if let Some(num_buffers) = out.get_mut(10..12) {
                    num_buffers.copy_from_slice(&1u16.to_le_bytes());
                }
                if let Some(payload) = out.get_mut(VNET_HDR_LEN..) {
                    payload.copy_from_slice(&frame);
                }
                return Ok(len);
            }
        }
        self.backend.read_frame(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        if let Some(responder) = self.responder.as_deref_mut() {
            if let Some(eth) = frame.get(VNET_HDR_LEN..) {
                if is_for_mmds(eth, responder.ip()) {
                    responder.receive(eth);
                    return Ok(frame.len());
                }
            }
        }
        self.backend.write_frame(frame)
    }
}
