//! Builds the guest's devices: places them on the PIO/MMIO buses, gives each an IRQ (an irqfd on
//! an IOAPIC pin), registers virtio queue notifications as ioeventfds, and collects the kernel
//! command-line announcements for virtio-mmio devices.
//!
//! [`DeviceManager`] builds the set (new devices, or restored ones: see `persist`); once built it
//! splits into the [`Devices`] a running VM keeps (to save, inspect and flush them) and the
//! [`DeviceWiring`] handed to the vCPU threads and the event loop.

mod balloon_limits;
mod persist;

pub use balloon_limits::check_balloon_target;
pub use persist::{
    DeviceOverrides, DevicesState, NetOverride, NetRateLimits, SavedDevice, SavedVirtio,
    VsockOverride,
};

use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::interrupt::IrqFdLine;
use devices::legacy::{ConsoleWatch, SerialConsole, SerialConstructorArgs, I8042};
use devices::persist::Persist;
use devices::virtio::balloon::{Balloon, BalloonConfig, BalloonError};
use devices::virtio::block::{Block, BlockConfig, BlockError};
use devices::virtio::mmio::{
    kernel_cmdline_entry, MmioError, MmioTransport, MmioTransportArgs, MMIO_WINDOW_SIZE,
    QUEUE_NOTIFY_OFFSET,
};
use devices::virtio::net::{Net, NetConfig, NetError, Tap};
use devices::virtio::vsock::{Vsock, VsockConfig, VsockHandle};
use devices::virtio::{VirtioDevice, VirtioInterrupt};
use devices::GuestMemory;
use event_manager::MutEventSubscriber;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::layout::{
    FIRST_DEVICE_IRQ, IOAPIC_PINS, KEYBOARD_IRQ, SERIAL_IRQ, VIRTIO_MMIO_BASE,
};
use crate::event_loop::Subscriber;
use crate::exit::ExitSink;
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
    #[error("device counters: {0}")]
    Metrics(#[from] vmm_metrics::MetricsError),
    #[error("vsock device: {0}")]
    Vsock(devices::virtio::vsock::VsockError),
    #[error("a VM has at most one vsock device")]
    SecondVsock,
    #[error("balloon device: {0}")]
    Balloon(BalloonError),
    #[error("{0}")]
    BalloonTarget(String),
    #[error("a VM has at most one balloon device")]
    SecondBalloon,
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
    Balloon {
        config: BalloonConfig,
    },
}

/// A virtio device model, typed, so that it can be saved ([`devices::persist::Persist`]).
#[derive(Clone)]
pub(crate) enum VirtioModel {
    Block(Arc<Mutex<Block>>),
    Net(Arc<Mutex<Net<Tap>>>),
    Vsock(Arc<Mutex<Vsock>>),
    Balloon(Arc<Mutex<Balloon>>),
}

/// A virtio-mmio device as placed in the guest.
pub(crate) struct VirtioSlot {
    kind: VirtioKind,
    irq: u32,
    mmio_base: u64,
    transport: Arc<Mutex<MmioTransport>>,
    model: VirtioModel,
}

/// One virtio device as observers see it (status, logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioSlotInfo {
    pub kind: VirtioKind,
    pub mmio_base: u64,
    pub irq: u32,
}

/// Builds a VM's device set; [`DeviceManager::finish`] hands it over to the running VM.
pub struct DeviceManager {
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialConsole>>,
    i8042: Arc<Mutex<I8042>>,
    console_panicked: Arc<AtomicBool>,
    /// Event-loop subscribers to register once the loop starts.
    subscribers: Vec<Subscriber>,
    /// `virtio_mmio.device=` announcements for the kernel command line.
    cmdline_additions: Vec<String>,
    virtio: Vec<VirtioSlot>,
    next_irq: u32,
    next_mmio: u64,
    /// Each device's counters come from here as it is placed.
    metrics: vmm_metrics::VmMetrics,
}

/// What the vCPU threads and the event loop take from a built device set.
pub struct DeviceWiring {
    pub pio: Bus,
    pub mmio: Bus,
    pub subscribers: Vec<Subscriber>,
}

/// A running VM's devices: saved by snapshots (`persist`), listed by status, flushed by
/// hibernation.
pub struct Devices {
    serial: Arc<Mutex<SerialConsole>>,
    i8042: Arc<Mutex<I8042>>,
    console_panicked: Arc<AtomicBool>,
    virtio: Vec<VirtioSlot>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Devices {
    /// The console (for stdin input).
    pub fn serial(&self) -> Arc<Mutex<SerialConsole>> {
        self.serial.clone()
    }

    /// Presses Ctrl+Alt+Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&self) -> Result<(), devices::legacy::i8042::I8042Error> {
        lock(&self.i8042).send_ctrl_alt_del()
    }

    /// Whether the guest kernel printed a panic on the console.
    pub fn console_panicked(&self) -> bool {
        self.console_panicked
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The virtio devices in slot order.
    pub fn virtio(&self) -> Vec<VirtioSlotInfo> {
        self.virtio
            .iter()
            .map(|slot| VirtioSlotInfo {
                kind: slot.kind.clone(),
                mmio_base: slot.mmio_base,
                irq: slot.irq,
            })
            .collect()
    }

    /// In-process connections to the vsock device, if there is one.
    pub fn vsock(&self) -> Option<VsockHandle> {
        self.virtio.iter().find_map(|slot| match &slot.model {
            VirtioModel::Vsock(vsock) => Some(lock(vsock).handle()),
            _ => None,
        })
    }

    /// Disk `index` (in slot order among disks, the first is /dev/vda).
    pub fn disk(&self, index: usize) -> Option<Arc<Mutex<Block>>> {
        self.virtio
            .iter()
            .filter_map(|slot| match &slot.model {
                VirtioModel::Block(d) => Some(d.clone()),
                _ => None,
            })
            .nth(index)
    }

    /// Network device `index` (in slot order among network devices).
    pub fn net(&self, index: usize) -> Option<Arc<Mutex<Net<Tap>>>> {
        self.virtio
            .iter()
            .filter_map(|slot| match &slot.model {
                VirtioModel::Net(d) => Some(d.clone()),
                _ => None,
            })
            .nth(index)
    }

    /// The balloon device, if there is one.
    pub fn balloon(&self) -> Option<Arc<Mutex<Balloon>>> {
        self.virtio.iter().find_map(|slot| match &slot.model {
            VirtioModel::Balloon(b) => Some(b.clone()),
            _ => None,
        })
    }

    /// Whether the VM's vsock device runs on the vhost-kernel datapath (its activation, on a
    /// vCPU thread, then opens `/dev/vhost-vsock`).
    pub fn vhost_vsock(&self) -> bool {
        self.virtio.iter().any(|slot| match &slot.model {
            VirtioModel::Vsock(vsock) => {
                lock(vsock).datapath() == devices::virtio::vsock::Datapath::Vhost
            }
            _ => false,
        })
    }

    /// The image of the first disk (recorded in snapshots as the root filesystem's identity).
    pub fn first_disk(&self) -> Option<std::path::PathBuf> {
        self.virtio.iter().find_map(|s| match &s.kind {
            VirtioKind::Block { path, .. } => Some(path.clone()),
            _ => None,
        })
    }

    /// The images of the writable disks.
    pub fn writable_disks(&self) -> Vec<std::path::PathBuf> {
        self.virtio
            .iter()
            .filter_map(|s| match &s.kind {
                VirtioKind::Block {
                    path,
                    read_only: false,
                    ..
                } => Some(path.clone()),
                _ => None,
            })
            .collect()
    }
}

impl DeviceManager {
    /// Creates the legacy devices every guest gets: COM1 console and the i8042 reset line.
    pub fn new(
        vm: &Vm,
        console_out: Box<dyn Write + Send>,
        exit: Arc<ExitSink>,
        metrics: vmm_metrics::VmMetrics,
    ) -> Result<Self, DeviceError> {
        Self::with_legacy_devices(vm, console_out, exit, None, metrics)
    }

    /// The legacy devices, with the serial port restored from `serial_state` when given.
    fn with_legacy_devices(
        vm: &Vm,
        console_out: Box<dyn Write + Send>,
        exit: Arc<ExitSink>,
        serial_state: Option<&devices::legacy::SerialState>,
        metrics: vmm_metrics::VmMetrics,
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
        let keyboard_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&keyboard_evt, KEYBOARD_IRQ)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            exit,
            Arc::new(IrqFdLine(keyboard_evt)),
        )));
        pio.insert(i8042.clone(), I8042::BASE, I8042::LEN)?;
        Ok(Self {
            pio,
            mmio: Bus::new(),
            serial,
            i8042,
            console_panicked,
            subscribers: Vec::new(),
            cmdline_additions: Vec::new(),
            virtio: Vec::new(),
            next_irq: FIRST_DEVICE_IRQ,
            next_mmio: VIRTIO_MMIO_BASE,
            metrics,
        })
    }

    /// The `virtio_mmio.device=` announcements for the guest's command line.
    pub fn cmdline_additions(&self) -> &[String] {
        &self.cmdline_additions
    }

    /// Ends building: what the running VM keeps, and what its threads take.
    pub fn finish(self) -> (Devices, DeviceWiring) {
        (
            Devices {
                serial: self.serial,
                i8042: self.i8042,
                console_panicked: self.console_panicked,
                virtio: self.virtio,
            },
            DeviceWiring {
                pio: self.pio,
                mmio: self.mmio,
                subscribers: self.subscribers,
            },
        )
    }

    /// Reserves the next IRQ and MMIO window for a virtio-mmio device.
    fn allocate_virtio_slot(&mut self, window: u64) -> Result<(u32, u64), DeviceError> {
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
    /// Places a virtio device: an IRQ with its irqfd, a 4 KiB MMIO window with one ioeventfd per
    /// queue, the kernel command-line announcement, and the device as an event-loop subscriber.
    /// In a new slot, or with `restore` in its saved slot over its saved transport (which
    /// re-activates the device if the driver had it running).
    fn place(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        model: VirtioModel,
        kind: VirtioKind,
        restore: Option<RestoreSlot<'_>>,
    ) -> Result<(), DeviceError> {
        let (irq, base) = match restore {
            Some(r) => (r.irq, r.base),
            None => self.allocate_virtio_slot(MMIO_WINDOW_SIZE)?,
        };
        if irq >= IOAPIC_PINS || !(VIRTIO_MMIO_BASE..0xfec0_0000).contains(&base) {
            return Err(DeviceError::BadSlot { base, irq });
        }
        self.next_irq = self.next_irq.max(irq + 1);
        self.next_mmio = self.next_mmio.max(base + MMIO_WINDOW_SIZE);
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&irq_evt, irq)?;
        let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(IrqFdLine(irq_evt))));
        let (transport, subscriber) = match &model {
            VirtioModel::Block(d) => (
                Self::transport(d.clone(), mem, interrupt, restore)?,
                d.clone() as Subscriber,
            ),
            VirtioModel::Net(d) => (
                Self::transport(d.clone(), mem, interrupt, restore)?,
                d.clone() as Subscriber,
            ),
            VirtioModel::Vsock(d) => (
                Self::transport(d.clone(), mem, interrupt, restore)?,
                d.clone() as Subscriber,
            ),
            VirtioModel::Balloon(d) => (
                Self::transport(d.clone(), mem, interrupt, restore)?,
                d.clone() as Subscriber,
            ),
        };
        for (index, evt) in transport.queue_events().iter().enumerate() {
            vm.register_mmio_ioevent(evt, base + QUEUE_NOTIFY_OFFSET, index as u32)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
        self.cmdline_additions.push(kernel_cmdline_entry(base, irq));
        self.subscribers.push(subscriber);
        tracing::debug!("virtio {kind:?} at {base:#x} irq {irq}");
        self.virtio.push(VirtioSlot {
            kind,
            irq,
            mmio_base: base,
            transport,
            model,
        });
        Ok(())
    }

    fn transport<D>(
        device: Arc<Mutex<D>>,
        mem: &GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
        restore: Option<RestoreSlot<'_>>,
    ) -> Result<MmioTransport, DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        Ok(match restore {
            Some(r) => {
                let args = MmioTransportArgs {
                    device,
                    mem: mem.clone(),
                    interrupt,
                };
                MmioTransport::restore(args, r.transport)?
            }
            None => MmioTransport::new(device, mem.clone(), interrupt)?,
        })
    }

    /// A disk in a new slot.
    pub fn add_block(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        config: BlockConfig,
    ) -> Result<(), DeviceError> {
        let path = config.path.clone();
        let block = Block::new(config).map_err(|e| DeviceError::Block(path, e))?;
        self.place_block(vm, mem, block, None)
    }

    fn place_block(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        mut block: Block,
        restore: Option<RestoreSlot<'_>>,
    ) -> Result<(), DeviceError> {
        let state = block.save();
        // Firecracker's drive id where there is one (it is the serial), else the guest's name.
        let disks = self
            .virtio
            .iter()
            .filter(|s| matches!(s.model, VirtioModel::Block(_)))
            .count();
        let id = match &state.id {
            Some(id) => id.clone(),
            None => guest_disk_name(disks),
        };
        block.set_metrics(self.metrics.block(&id)?);
        let kind = VirtioKind::Block {
            path: state.path,
            read_only: state.read_only,
            id: state.id,
        };
        let model = VirtioModel::Block(Arc::new(Mutex::new(block)));
        self.place(vm, mem, model, kind, restore)
    }

    /// A network device on a TAP in a new slot.
    pub fn add_net(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        config: NetConfig,
    ) -> Result<(), DeviceError> {
        let tap = config.tap.clone();
        let net = Net::new(config).map_err(|e| DeviceError::Net(tap, e))?;
        self.place_net(vm, mem, net, None)
    }

    fn place_net(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        mut net: Net<Tap>,
        restore: Option<RestoreSlot<'_>>,
    ) -> Result<(), DeviceError> {
        let nets = self
            .virtio
            .iter()
            .filter(|s| matches!(s.model, VirtioModel::Net(_)))
            .count();
        net.set_metrics(self.metrics.net(&format!("eth{nets}"))?);
        // New and restored devices both come here: a restored VM's MMDS counts too.
        net.set_mmds_metrics(self.metrics.mmds().clone());
        let state = net.save();
        let kind = VirtioKind::Net {
            tap: state.tap,
            mac: state.mac,
        };
        let model = VirtioModel::Net(Arc::new(Mutex::new(net)));
        self.place(vm, mem, model, kind, restore)
    }

    /// The vsock device (at most one) in a new slot.
    pub fn add_vsock(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        device: Vsock,
    ) -> Result<(), DeviceError> {
        self.place_vsock(vm, mem, device, None)
    }

    fn place_vsock(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        mut device: Vsock,
        restore: Option<RestoreSlot<'_>>,
    ) -> Result<(), DeviceError> {
        if self
            .virtio
            .iter()
            .any(|slot| matches!(slot.model, VirtioModel::Vsock(_)))
        {
            return Err(DeviceError::SecondVsock);
        }
        device.set_metrics(self.metrics.vsock()?);
        tracing::info!(
            "vsock: guest CID {}, {:?} datapath",
            device.guest_cid(),
            device.datapath()
        );
        let kind = VirtioKind::Vsock {
            config: device.save().config,
        };
        let model = VirtioModel::Vsock(Arc::new(Mutex::new(device)));
        self.place(vm, mem, model, kind, restore)
    }
}

/// `vda`, `vdb`, … `vdz`, `vdaa`, …: the name Linux gives the `index`-th virtio disk.
fn guest_disk_name(index: usize) -> String {
    let mut suffix = Vec::new();
    let mut n = index;
    loop {
        suffix.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8_lossy(&suffix))
}

impl DeviceManager {
    /// The balloon device (at most one) in a new slot; its target at most `mem_mib`.
    pub fn add_balloon(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        config: BalloonConfig,
        mem_mib: u64,
    ) -> Result<(), DeviceError> {
        check_balloon_target(config.target_mib, mem_mib).map_err(DeviceError::BalloonTarget)?;
        let balloon = Balloon::new(config).map_err(DeviceError::Balloon)?;
        self.place_balloon(vm, mem, balloon, None)
    }

    fn place_balloon(
        &mut self,
        vm: &Vm,
        mem: &GuestMemory,
        device: Balloon,
        restore: Option<RestoreSlot<'_>>,
    ) -> Result<(), DeviceError> {
        if self
            .virtio
            .iter()
            .any(|slot| matches!(slot.model, VirtioModel::Balloon(_)))
        {
            return Err(DeviceError::SecondBalloon);
        }
        let kind = VirtioKind::Balloon {
            config: device.config(),
        };
        let model = VirtioModel::Balloon(Arc::new(Mutex::new(device)));
        self.place(vm, mem, model, kind, restore)
    }
}

/// Where a restored device goes and the transport state it resumes from.
#[derive(Clone, Copy)]
struct RestoreSlot<'a> {
    irq: u32,
    base: u64,
    transport: &'a devices::virtio::mmio::MmioTransportState,
}
