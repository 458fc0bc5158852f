//! How a device raises its interrupt line without knowing about KVM: the VMM hands it an
//! `InterruptLine`, normally an eventfd registered as a KVM irqfd.

use std::io;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

pub trait InterruptLine: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

/// An eventfd the VMM registered with KVM_IRQFD for a GSI: a write injects the interrupt.
pub struct IrqFdLine(pub EventFd);

impl InterruptLine for IrqFdLine {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Test helper: counts triggers.
#[derive(Default)]
pub struct CountingLine(pub std::sync::atomic::AtomicUsize);

impl InterruptLine for CountingLine {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

pub type SharedInterruptLine = Arc<dyn InterruptLine>;
