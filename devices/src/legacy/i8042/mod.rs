//! The i8042 keyboard controller with an AT keyboard on its first port and no mouse port, as
//! Firecracker emulates it: enough for Linux's i8042 and atkbd drivers to probe it quickly and
//! for the host to send Ctrl+Alt+Del (`I8042::send_ctrl_alt_del`). Writing 0xfe to port 0x64
//! pulls the CPU reset line (Linux's `reboot=k`), which ends the VM.
//!
//! Every port write comes from the guest: unknown commands are ignored, the output buffer holds
//! at most `BUF_SIZE` bytes, nothing panics.

mod keyboard;

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::interrupt::SharedInterruptLine;
use keyboard::Keyboard;

/// Port offsets from the 0x60 base.
const DATA_OFFSET: u64 = 0;
const STATUS_OFFSET: u64 = 4;

/// Controller commands (written to port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
const CMD_WRITE_AUX_OUTBUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

/// Answers to the tests.
const SELF_TEST_OK: u8 = 0x55;
const KBD_TEST_OK: u8 = 0x00;
/// "Clock line stuck low": there is no mouse port, and this answer tells Linux so at once.
const AUX_TEST_ABSENT: u8 = 0x01;

/// Status register bits.
const STR_OBF: u8 = 0x01;
const STR_SYS: u8 = 0x04;
const STR_CMD: u8 = 0x08;
/// Set: the keyboard is not locked.
const STR_KEYLOCK: u8 = 0x10;

/// Control register bits.
const CTR_KBDINT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

/// The controller's output buffer. Ctrl+Alt+Del needs 4 bytes; Firecracker's buffer is 16.
const BUF_SIZE: usize = 16;

/// What the i8042 does when the guest pulls the reset line.
pub trait ResetLine: Send + Sync {
    fn reset_requested(&self);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum I8042Error {
    #[error("the i8042's output buffer is full (the guest is not reading its keyboard)")]
    BufferFull,
}

pub struct I8042 {
    reset: Arc<dyn ResetLine>,
    /// IRQ 1.
    irq: SharedInterruptLine,
    control: u8,
    outp: u8,
    /// A controller command waiting for its parameter on port 0x60.
    awaiting_param: Option<u8>,
    /// Whether the self-test ran (the status register's system flag).
    system_flag: bool,
    buf: VecDeque<u8>,
    keyboard: Keyboard,
}

impl I8042 {
    pub const BASE: u64 = 0x60;
    pub const LEN: u64 = 5;

    pub fn new(reset: Arc<dyn ResetLine>, irq: SharedInterruptLine) -> Self {
        Self {
            reset,
            irq,
            control: CTR_KBDINT | CTR_SYS | CTR_AUXDIS,
            outp: 0,
            awaiting_param: None,
            system_flag: true,
            buf: VecDeque::with_capacity(BUF_SIZE),
            keyboard: Keyboard::default(),
        }
    }

    /// Queues Ctrl, Alt, Del pressed (scancode set 1 if the guest has the controller translate,
    /// set 2 otherwise) and raises IRQ 1. All or nothing: fails when the buffer lacks room.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        let keys = if self.control & CTR_XLATE != 0 {
            keyboard::CTRL_ALT_DEL_SET1
        } else {
            keyboard::CTRL_ALT_DEL_SET2
        };
        if BUF_SIZE - self.buf.len() < keys.len() {
            return Err(I8042Error::BufferFull);
        }
        self.buf.extend(keys);
        self.raise_irq();
        Ok(())
    }

    fn status(&self) -> u8 {
        let mut status = STR_KEYLOCK;
        if !self.buf.is_empty() {
            status |= STR_OBF;
        }
        if self.system_flag {
            status |= STR_SYS;
        }
        if self.awaiting_param.is_some() {
            status |= STR_CMD;
        }
        status
    }

    /// Replaces the buffer's content with one answer: the guest reads it next.
    fn answer(&mut self, bytes: &[u8]) {
        self.buf.clear();
        self.buf.extend(bytes.iter().take(BUF_SIZE));
    }

    /// Keyboard bytes interrupt the guest if it enabled the keyboard interrupt; Linux polls
    /// for controller answers with it off.
    fn raise_irq(&self) {
        if self.control & CTR_KBDINT == 0 {
            return;
        }
        if let Err(e) = self.irq.trigger() {
            tracing::warn!("i8042: raising IRQ 1: {e}");
        }
    }

    fn command(&mut self, cmd: u8) {
        self.awaiting_param = None;
        self.keyboard.cancel();
        match cmd {
            CMD_READ_CTR => self.answer(&[self.control]),
            CMD_READ_OUTP => self.answer(&[self.outp]),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUTBUF | CMD_WRITE_AUX_OUTBUF
            | CMD_WRITE_AUX => self.awaiting_param = Some(cmd),
            CMD_SELF_TEST => {
                self.system_flag = true;
                self.answer(&[SELF_TEST_OK]);
            }
            CMD_KBD_TEST => self.answer(&[KBD_TEST_OK]),
            CMD_AUX_TEST => self.answer(&[AUX_TEST_ABSENT]),
            CMD_KBD_DISABLE => self.control |= CTR_KBDDIS,
            CMD_KBD_ENABLE => self.control &= !CTR_KBDDIS,
            CMD_AUX_DISABLE => self.control |= CTR_AUXDIS,
            CMD_AUX_ENABLE => self.control &= !CTR_AUXDIS,
            CMD_RESET_CPU => self.reset.reset_requested(),
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        match self.awaiting_param.take() {
            Some(CMD_WRITE_CTR) => self.control = byte,
            Some(CMD_WRITE_OUTP) => self.outp = byte,
            Some(CMD_WRITE_KBD_OUTBUF) => {
                self.answer(&[byte]);
                self.raise_irq();
            }
            // No mouse: the byte comes back on the keyboard's side (no AUXDATA status), which
            // Linux's loop test reads as "no AUX port" at once instead of after a timeout.
            Some(CMD_WRITE_AUX_OUTBUF) => self.answer(&[byte]),
            // Bytes for the absent mouse are lost.
            Some(_) => {}
            None => {
                let answer = self.keyboard.answer(byte);
                self.answer(answer);
                self.raise_irq();
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // Byte-wide ports: wider accesses read zero and change nothing.
        let [out] = data else {
            return;
        };
        match offset {
            STATUS_OFFSET => *out = self.status(),
            DATA_OFFSET => {
                *out = self.buf.pop_front().unwrap_or(0);
                // One interrupt per byte: more to read means another edge.
                if !self.buf.is_empty() {
                    self.raise_irq();
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [byte] = data else {
            return;
        };
        match offset {
            STATUS_OFFSET => self.command(*byte),
            DATA_OFFSET => self.data(*byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
