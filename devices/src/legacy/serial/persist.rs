//! The serial console's saved state and its `Persist` implementation.

use std::io;

use vm_superio::serial::{Error as SuperioError, NoEvents, SerialState as SuperioState};
use vm_superio::Serial;

use super::{ConsoleWatch, LineTrigger, SerialConsole};
use crate::interrupt::SharedInterruptLine;
use crate::persist::Persist;

/// Saved serial registers (vm-superio's state, in a serde type of our own).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The host side of a restored serial console.
pub struct SerialConstructorArgs {
    /// The console's interrupt line (COM1's irqfd).
    pub irq: SharedInterruptLine,
    /// Where the guest's output goes.
    pub out: ConsoleWatch,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("saved receive buffer holds {0} bytes, more than the FIFO")]
    InBufferTooLong(usize),
    #[error("raising the restored console's pending interrupt: {0}")]
    Interrupt(#[source] io::Error),
    #[error("restoring the console: {0}")]
    Io(#[source] io::Error),
}

impl Persist for SerialConsole {
    type State = SerialState;
    type ConstructorArgs = SerialConstructorArgs;
    type Error = SerialError;

    fn save(&self) -> SerialState {
        let s = self.serial.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Restore is construction from the saved registers; an interrupt the guest had pending is
    /// raised again.
    fn restore(args: SerialConstructorArgs, state: &SerialState) -> Result<Self, SerialError> {
        let s = SuperioState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(&s, LineTrigger(args.irq), NoEvents, args.out).map_err(
            |e| match e {
                SuperioError::FullFifo => SerialError::InBufferTooLong(state.in_buffer.len()),
                SuperioError::Trigger(e) => SerialError::Interrupt(e),
                SuperioError::IOError(e) => SerialError::Io(e),
            },
        )?;
        Ok(Self { serial })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use super::*;
    use crate::bus::BusDevice;
    use crate::interrupt::CountingLine;

    fn args() -> SerialConstructorArgs {
        SerialConstructorArgs {
            irq: Arc::new(CountingLine::default()),
            out: ConsoleWatch::new(Box::new(io::sink()), Arc::new(AtomicBool::new(false))),
        }
    }

    #[test]
    fn restore_of_save_round_trips() {
        let mut s = SerialConsole::new(
            Arc::new(CountingLine::default()),
            ConsoleWatch::new(Box::new(io::sink()), Arc::new(AtomicBool::new(false))),
        );
        s.write(3, &[0x80]); // LCR: DLAB
        s.write(0, &[0x0c]); // divisor low
        s.write(3, &[0x03]); // LCR: 8N1
        s.write(7, &[0x5a]); // scratch
        s.write(1, &[0x01]); // IER
        s.enqueue_input(b"xyz").unwrap();
        let saved = s.save();
        assert_eq!(saved.in_buffer, b"xyz");
        assert_eq!(saved.scratch, 0x5a);
        let restored = SerialConsole::restore(args(), &saved).unwrap();
        assert_eq!(restored.save(), saved);
    }

    #[test]
    fn a_receive_buffer_longer_than_the_fifo_is_an_error() {
        let state = SerialState {
            in_buffer: vec![b'a'; 4096],
            ..SerialState::default()
        };
        assert!(matches!(
            SerialConsole::restore(args(), &state),
            Err(SerialError::InBufferTooLong(4096))
        ));
    }
}
