//! Builds the guest's devices: places them on the PIO/MMIO buses, gives each an IRQ (an irqfd on
//! an IOAPIC pin), registers virtio queue notifications as ioeventfds, and collects the kernel
//! command-line announcements for virtio-mmio devices.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::interrupt::IrqFdLine;
use devices::legacy::{ConsoleWatch, I8042, SerialConsole};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::layout::{FIRST_DEVICE_IRQ, IOAPIC_PINS, SERIAL_IRQ, VIRTIO_MMIO_BASE};
use crate::event_loop::Subscriber;
use crate::hypervisor::vcpu::ExitSink;
use crate::hypervisor::{HypervisorError, Vm};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("device address conflict: {0}")]
    Bus(#[from] BusError),
    #[error("out of IRQs: the IOAPIC has {IOAPIC_PINS} pins")]
    OutOfIrqs,
}

pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub console_panicked: Arc<AtomicBool>,
    /// Event-loop subscribers to register once the loop starts.
    pub subscribers: Vec<Subscriber>,
    /// `virtio_mmio.device=` announcements for the kernel command line.
    pub cmdline_additions: Vec<String>,
    next_irq: u32,
    next_mmio: u64,
}

impl DeviceManager {
    /// Creates the legacy devices every guest gets: COM1 console and the i8042 reset line.
    pub fn new(
        vm: &Vm,
        console_out: Box<dyn Write + Send>,
        exit: Arc<ExitSink>,
    ) -> Result<Self, DeviceError> {
        let mut pio = Bus::new();
        let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&serial_evt, SERIAL_IRQ)?;
        let console_panicked = Arc::new(AtomicBool::new(false));
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            Arc::new(IrqFdLine(serial_evt)),
            ConsoleWatch::new(console_out, console_panicked.clone()),
        )));
        pio.insert(serial.clone(), SerialConsole::COM1_BASE, SerialConsole::LEN)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(exit))),
            I8042::BASE,
            I8042::LEN,
        )?;
        Ok(Self {
            pio,
            mmio: Bus::new(),
            serial,
            console_panicked,
            subscribers: Vec::new(),
            cmdline_additions: Vec::new(),
            next_irq: FIRST_DEVICE_IRQ,
            next_mmio: VIRTIO_MMIO_BASE,
        })
    }

    /// Reserves the next IRQ and MMIO window for a virtio-mmio device.
    pub fn allocate_virtio_slot(&mut self, window: u64) -> Result<(u32, u64), DeviceError> {
        if self.next_irq >= IOAPIC_PINS {
            return Err(DeviceError::OutOfIrqs);
        }
        let slot = (self.next_irq, self.next_mmio);
        self.next_irq += 1;
        self.next_mmio += window;
        Ok(slot)
    }
}
