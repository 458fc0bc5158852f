//! Builds the guest's devices: places them on the PIO/MMIO buses, gives each an IRQ (an irqfd on
//! an IOAPIC pin), registers virtio queue notifications as ioeventfds, and collects the kernel
//! command-line announcements for virtio-mmio devices.

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::interrupt::IrqFdLine;
use devices::legacy::{ConsoleWatch, SerialConsole, SerialConstructorArgs, I8042};
use devices::persist::Persist;
use devices::virtio::block::{Block, BlockConfig, BlockError};
use devices::virtio::mmio::{
    kernel_cmdline_entry, MmioError, MmioTransport, MmioTransportArgs, MMIO_WINDOW_SIZE,
    QUEUE_NOTIFY_OFFSET,
};
use devices::virtio::net::{Net, NetConfig, NetError};
use devices::virtio::vsock::{Vsock, VsockConfig};
use devices::virtio::{VirtioDevice, VirtioInterrupt};
use devices::GuestMemory;
use event_manager::MutEventSubscriber;
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
    #[error("disk {0}: {1}")]
    Block(std::path::PathBuf, BlockError),
    #[error("network device on TAP {0}: {1}")]
    Net(String, NetError),
    #[error("virtio transport: {0}")]
    Mmio(#[from] MmioError),
    #[error("a VM has at most one vsock device")]
    SecondVsock,
    #[error("saved serial state is invalid: {0}")]
    SerialState(devices::legacy::SerialError),
    #[error("saved virtio slot {base:#x} irq {irq} does not fit this VM")]
    BadSlot { base: u64, irq: u32 },
}

/// What kind of virtio device sits in a slot (for info, snapshots and logs).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VirtioKind {
    Block {
        path: std::path::PathBuf,
        read_only: bool,
        #[serde(default)]
        id: Option<String>,
    },
    Net {
        tap: String,
        mac: [u8; 6],
    },
    Vsock {
        config: VsockConfig,
    },
}

/// A virtio-mmio device as placed in the guest.
pub struct VirtioSlot {
    pub kind: VirtioKind,
    pub irq: u32,
    pub mmio_base: u64,
    pub transport: Arc<Mutex<MmioTransport>>,
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
    pub virtio: Vec<VirtioSlot>,
    /// The vsock device, for in-process connections and snapshots.
    pub vsock: Option<Arc<Mutex<Vsock>>>,
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
        Self::with_serial_state(vm, console_out, exit, None)
    }

    /// The legacy devices, with the serial port restored from `serial_state` when given.
    pub fn with_serial_state(
        vm: &Vm,
        console_out: Box<dyn Write + Send>,
        exit: Arc<ExitSink>,
        serial_state: Option<&devices::legacy::SerialState>,
    ) -> Result<Self, DeviceError> {
        let mut pio = Bus::new();
        let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&serial_evt, SERIAL_IRQ)?;
        let console_panicked = Arc::new(AtomicBool::new(false));
        let line = Arc::new(IrqFdLine(serial_evt));
        let watch = ConsoleWatch::new(console_out, console_panicked.clone());
        let serial = match serial_state {
            Some(state) => {
                let args = SerialConstructorArgs {
                    irq: line,
                    out: watch,
                };
                SerialConsole::restore(args, state).map_err(DeviceError::SerialState)?
            }
            None => SerialConsole::new(line, watch),
        };
        let serial = Arc::new(Mutex::new(serial));
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
            virtio: Vec::new(),
            vsock: None,
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

impl DeviceManager {
    /// Places a virtio device behind a virtio-mmio transport: an IRQ with its irqfd, a 4 KiB MMIO
    /// window with one ioeventfd per queue, the kernel command-line announcement, and the device
    /// as an event-loop subscriber.
    pub fn add_virtio_device<D>(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        device: Arc<Mutex<D>>,
        kind: VirtioKind,
    ) -> Result<(), DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let (irq, base) = self.allocate_virtio_slot(MMIO_WINDOW_SIZE)?;
        self.place_virtio_device(vm, mem, device, kind, irq, base, None)
    }

    /// Places a device at a given slot; with `saved`, the transport is restored from it (and
    /// re-activates the device if the driver had it running).
    #[allow(clippy::too_many_arguments)]
    pub fn place_virtio_device<D>(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        device: Arc<Mutex<D>>,
        kind: VirtioKind,
        irq: u32,
        base: u64,
        saved: Option<&devices::virtio::mmio::MmioTransportState>,
    ) -> Result<(), DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        if irq >= IOAPIC_PINS || !(VIRTIO_MMIO_BASE..0xfec0_0000).contains(&base) {
            return Err(DeviceError::BadSlot { base, irq });
        }
        self.next_irq = self.next_irq.max(irq + 1);
        self.next_mmio = self.next_mmio.max(base + MMIO_WINDOW_SIZE);
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&irq_evt, irq)?;
        let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(IrqFdLine(irq_evt))));
        let transport = match saved {
            Some(state) => {
                let args = MmioTransportArgs {
                    device: device.clone(),
                    mem: mem.clone(),
                    interrupt,
                };
                MmioTransport::restore(args, state)?
            }
            None => MmioTransport::new(device.clone(), mem.clone(), interrupt)?,
        };
        for (index, evt) in transport.queue_events().iter().enumerate() {
            vm.register_mmio_ioevent(evt, base + QUEUE_NOTIFY_OFFSET, index as u32)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
        self.cmdline_additions.push(kernel_cmdline_entry(base, irq));
        self.subscribers.push(device);
        tracing::debug!("virtio {kind:?} at {base:#x} irq {irq}");
        self.virtio.push(VirtioSlot {
            kind,
            irq,
            mmio_base: base,
            transport,
        });
        Ok(())
    }

    pub fn add_block(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        config: BlockConfig,
    ) -> Result<(), DeviceError> {
        self.add_block_at(vm, mem, config, None)
    }

    /// A disk in a new slot, or — with `restore` — in its saved slot with its saved transport.
    pub fn add_block_at(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        config: BlockConfig,
        restore: Option<RestoreSlot<'_>>,
    ) -> Result<(), DeviceError> {
        let kind = VirtioKind::Block {
            path: config.path.clone(),
            read_only: config.read_only,
            id: config.id.clone(),
        };
        let path = config.path.clone();
        let block = Block::new(config).map_err(|e| DeviceError::Block(path, e))?;
        self.place(vm, mem, Arc::new(Mutex::new(block)), kind, restore)
    }

    pub fn add_net(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        config: NetConfig,
    ) -> Result<(), DeviceError> {
        self.add_net_at(vm, mem, config, None)
    }

    pub fn add_net_at(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        config: NetConfig,
        restore: Option<RestoreSlot<'_>>,
    ) -> Result<(), DeviceError> {
        let tap = config.tap.clone();
        let net = Net::new(config).map_err(|e| DeviceError::Net(tap.clone(), e))?;
        let kind = VirtioKind::Net {
            tap,
            mac: net.mac(),
        };
        self.place(vm, mem, Arc::new(Mutex::new(net)), kind, restore)
    }

    /// The vsock device (at most one), new or restored.
    pub fn add_vsock_at(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        device: Vsock,
        restore: Option<RestoreSlot<'_>>,
    ) -> Result<(), DeviceError> {
        if self.vsock.is_some() {
            return Err(DeviceError::SecondVsock);
        }
        tracing::info!(
            "vsock: guest CID {}, {:?} datapath",
            device.guest_cid(),
            device.datapath()
        );
        let kind = VirtioKind::Vsock {
            config: device.save().config,
        };
        let device = Arc::new(Mutex::new(device));
        self.vsock = Some(device.clone());
        self.place(vm, mem, device, kind, restore)
    }

    fn place<D>(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        device: Arc<Mutex<D>>,
        kind: VirtioKind,
        restore: Option<RestoreSlot<'_>>,
    ) -> Result<(), DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        match restore {
            Some(r) => {
                self.place_virtio_device(vm, mem, device, kind, r.irq, r.base, Some(r.state))
            }
            None => self.add_virtio_device(vm, mem, device, kind),
        }
    }
}

/// Where a restored device goes and the transport state it resumes from.
#[derive(Clone, Copy)]
pub struct RestoreSlot<'a> {
    pub irq: u32,
    pub base: u64,
    pub state: &'a devices::virtio::mmio::MmioTransportState,
}
