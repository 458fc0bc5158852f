//! The 16550A console (vm-superio) on port 0x3f8, interrupt-driven through an irqfd.
//!
//! Output goes to any writer (the CLI's stdout, a log file, a buffer in tests) through a
//! `ConsoleWatch`, which notices a guest kernel panic in the byte stream: with `panic=-1` a
//! panicking kernel reboots at once, and the VMM must still report the panic as a failure.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::bus::BusDevice;
use crate::interrupt::SharedInterruptLine;

mod persist;

pub use persist::{SerialConstructorArgs, SerialError, SerialState};

const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// Adapts an `InterruptLine` to vm-superio's `Trigger`.
pub struct LineTrigger(pub SharedInterruptLine);

impl Trigger for LineTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// A writer that forwards the console stream and records whether the guest kernel panicked.
pub struct ConsoleWatch {
    out: Box<dyn Write + Send>,
    matched: usize,
    panicked: Arc<AtomicBool>,
}

impl ConsoleWatch {
    pub fn new(out: Box<dyn Write + Send>, panicked: Arc<AtomicBool>) -> Self {
        Self {
            out,
            matched: 0,
            panicked,
        }
    }

    fn scan(&mut self, byte: u8) {
        if PANIC_MARKER.get(self.matched) == Some(&byte) {
            self.matched += 1;
            if self.matched == PANIC_MARKER.len() {
                self.panicked.store(true, Ordering::SeqCst);
                self.matched = 0;
            }
        } else {
            self.matched = usize::from(PANIC_MARKER.first() == Some(&byte));
        }
    }
}

impl Write for ConsoleWatch {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        buf.iter().for_each(|b| self.scan(*b));
        // The console is interactive: push every byte out at once.
        self.out.write_all(buf)?;
        self.out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

pub struct SerialConsole {
    serial: Serial<LineTrigger, NoEvents, ConsoleWatch>,
}

impl SerialConsole {
    pub const COM1_BASE: u64 = 0x3f8;
    pub const LEN: u64 = 8;

    pub fn new(irq: SharedInterruptLine, out: ConsoleWatch) -> Self {
        Self {
            serial: Serial::new(LineTrigger(irq), out),
        }
    }

    /// Room in the receive FIFO; input beyond it must wait (backpressure on stdin).
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes were taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.serial
            .enqueue_raw_bytes(bytes)
            .map_err(|e| io::Error::other(format!("serial input: {e:?}")))
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) if offset < Self::LEN => data[0] = self.serial.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if offset < Self::LEN {
                if let Err(e) = self.serial.write(off, *value) {
                    tracing::warn!("serial write failed: {e:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingLine;
    use crate::persist::Persist;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_writer_and_panic_is_noticed() {
        let buf = Buf::default();
        let panicked = Arc::new(AtomicBool::new(false));
        let line = Arc::new(CountingLine::default());
        let mut s = SerialConsole::new(
            line.clone(),
            ConsoleWatch::new(Box::new(buf.clone()), panicked.clone()),
        );
        for b in b"hi\nKernel panic - not syncing: x" {
            s.write(0, &[*b]);
        }
        assert!(buf.0.lock().unwrap().starts_with(b"hi\n"));
        assert!(panicked.load(Ordering::SeqCst));
    }

    #[test]
    fn panic_marker_survives_false_starts() {
        let panicked = Arc::new(AtomicBool::new(false));
        let mut w = ConsoleWatch::new(Box::new(io::sink()), panicked.clone());
        w.write_all(b"Kernel Kernel panic - not syncin").unwrap();
        assert!(!panicked.load(Ordering::SeqCst));
        w.write_all(b"KKernel panic - not syncing").unwrap();
        assert!(panicked.load(Ordering::SeqCst));
    }

    #[test]
    fn input_raises_interrupt_when_enabled_and_odd_accesses_are_safe() {
        let line = Arc::new(CountingLine::default());
        let mut s = SerialConsole::new(
            line.clone(),
            ConsoleWatch::new(Box::new(io::sink()), Arc::new(AtomicBool::new(false))),
        );
        s.write(1, &[0x01]); // IER: received data available
        assert_eq!(s.enqueue_input(b"ab").unwrap(), 2);
        assert!(line.0.load(Ordering::SeqCst) > 0);
        let mut b = [0u8; 1];
        s.read(0, &mut b);
        assert_eq!(b, [b'a']);
        let mut wide = [0u8; 4];
        s.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        s.write(u64::MAX, &[1]);
        s.write(0, &[]);
        let saved = s.save();
        let restored = SerialConsole::restore(
            SerialConstructorArgs {
                irq: line,
                out: ConsoleWatch::new(Box::new(io::sink()), Arc::new(AtomicBool::new(false))),
            },
            &saved,
        )
        .unwrap();
        assert_eq!(restored.save(), saved);
    }
}
