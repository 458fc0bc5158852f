//! The host side of the serial console: where guest output goes and where input comes from.
//! Stdin is read on the event loop; a TTY is put in raw mode and restored on drop.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::terminal::Terminal;

use crate::hypervisor::vcpu::{ExitSink, VmExit};
use devices::legacy::SerialConsole;

/// Ctrl-A then `x` ends the VM from an interactive console (as in QEMU), since Ctrl-C in raw
/// mode goes to the guest.
const ESCAPE: u8 = 0x01;

pub struct StdinInput {
    serial: Arc<Mutex<SerialConsole>>,
    exit: Arc<ExitSink>,
    escape_pending: bool,
    pending: Vec<u8>,
}

impl StdinInput {
    pub fn new(serial: Arc<Mutex<SerialConsole>>, exit: Arc<ExitSink>) -> Self {
        Self {
            serial,
            exit,
            escape_pending: false,
            pending: Vec::new(),
        }
    }

    /// Filters the escape sequence out of `bytes` and queues the rest for the guest.
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.escape_pending {
                self.escape_pending = false;
                match b {
                    b'x' | b'X' => {
                        self.exit.report(VmExit::HostShutdown);
                        return;
                    }
                    ESCAPE => self.pending.push(ESCAPE),
                    other => self.pending.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.escape_pending = true;
            } else {
                self.pending.push(b);
            }
        }
    }

    fn flush_to_serial(&mut self) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.input_capacity().min(self.pending.len());
        if room == 0 {
            return;
        }
        match serial.enqueue_input(&self.pending[..room]) {
            Ok(n) => {
                self.pending.drain(..n.min(self.pending.len()));
            }
            Err(e) => tracing::warn!("console input dropped: {e}"),
        }
    }
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            // The FIFO is 64 bytes; keep host input bounded until the guest drains it.
            if self.pending.len() < 4096 {
                let mut buf = [0u8; 256];
                match io::stdin().lock().read(&mut buf) {
                    Ok(0) => {
                        // EOF: stop watching stdin (the guest keeps running).
                        let _ = ops.remove(events);
                    }
                    Ok(n) => self.feed(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!("reading stdin failed: {e}");
                        let _ = ops.remove(events);
                    }
                }
            }
            self.flush_to_serial();
        } else if events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR)
        {
            let _ = ops.remove(events);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fd: RawFd = io::stdin().as_raw_fd();
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            // Stdin that cannot be polled (a regular file, /dev/null) means no console input.
            tracing::debug!("console input disabled: {e:?}");
        }
    }
}

/// Raw mode for an interactive console; the previous mode comes back on drop.
pub struct RawTerminalGuard {
    active: bool,
}

impl RawTerminalGuard {
    pub fn new() -> Self {
        let stdin = io::stdin().lock();
        // SAFETY: isatty on our own stdin fd.
        let tty = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
        let active = tty && stdin.set_raw_mode().is_ok();
        Self { active }
    }
}

impl Default for RawTerminalGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RawTerminalGuard {
    fn drop(&mut self) {
        if self.active {
            let _ = io::stdin().lock().set_canon_mode();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::interrupt::CountingLine;
    use devices::legacy::ConsoleWatch;
    use std::sync::atomic::AtomicBool;

    fn input() -> (StdinInput, Arc<ExitSink>) {
        let serial = SerialConsole::new(
            Arc::new(CountingLine::default()),
            ConsoleWatch::new(Box::new(io::sink()), Arc::new(AtomicBool::new(false))),
        );
        let exit = Arc::new(ExitSink::default());
        (
            StdinInput::new(Arc::new(Mutex::new(serial)), exit.clone()),
            exit,
        )
    }

    #[test]
    fn escape_sequence_ends_the_vm_and_is_filtered() {
        let (mut i, exit) = input();
        i.feed(b"ls\x01\x01a\x01b");
        assert_eq!(i.pending, b"ls\x01a\x01b");
        assert!(exit.get().is_none());
        i.feed(b"\x01x");
        assert_eq!(exit.get(), Some(VmExit::HostShutdown));
    }

    #[test]
    fn input_beyond_the_fifo_waits() {
        let (mut i, _) = input();
        i.feed(&[b'a'; 100]);
        i.flush_to_serial();
        assert_eq!(i.pending.len(), 100 - 64);
    }
}

/// Guest output split into lines, each sent on a channel (see `Console::lines`).
pub(crate) struct LineSender {
    partial: Vec<u8>,
    tx: std::sync::mpsc::Sender<String>,
}

impl LineSender {
    pub(crate) fn new(tx: std::sync::mpsc::Sender<String>) -> Self {
        Self {
            partial: Vec::new(),
            tx,
        }
    }
}

impl io::Write for LineSender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial).into_owned();
                self.partial.clear();
                // Nobody listening any more is not the guest's problem.
                let _ = self.tx.send(line);
            } else {
                self.partial.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod line_sender_tests {
    use std::io::Write;

    #[test]
    fn lines_arrive_whole_across_writes() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut w = super::LineSender::new(tx);
        w.write_all(b"ab").unwrap();
        w.write_all(b"c\nde\n\nf").unwrap();
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), ["abc", "de", ""]);
    }
}
