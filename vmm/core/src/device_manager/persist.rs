//! Saving and restoring the device set: one [`SavedVirtio`] per virtio device (its slot, its
//! transport and the device model's own state, typed by kind) plus the serial port. Restore is
//! construction: [`DeviceManager::restore`] builds every device from its state and the host
//! resources (with [`DeviceOverrides`] for a clone's own disks, TAPs and vsock identity), or
//! returns an error and nothing.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use devices::legacy::SerialState;
use devices::persist::Persist;
use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::balloon::{Balloon, BalloonConstructorArgs, BalloonState};
use devices::virtio::block::{Block, BlockConstructorArgs, BlockState};
use devices::virtio::mmio::{MmioTransportState, MMIO_WINDOW_SIZE};
use devices::virtio::net::{Net, NetConstructorArgs, NetState};
use devices::virtio::vsock::{Vsock, VsockConstructorArgs, VsockState};
use devices::GuestMemory;
use serde::{Deserialize, Serialize};

use super::{lock, DeviceError, DeviceManager, Devices, RestoreSlot, VirtioKind, VirtioModel};
use crate::boot::layout::{FIRST_DEVICE_IRQ, IOAPIC_ADDR, IOAPIC_PINS, VIRTIO_MMIO_BASE};
use crate::exit::ExitSink;
use crate::hypervisor::Vm;

/// The saved device set.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    /// In slot order.
    pub virtio: Vec<SavedVirtio>,
}

/// A virtio device's slot, transport and model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedVirtio {
    pub irq: u32,
    pub mmio_base: u64,
    pub transport: MmioTransportState,
    pub device: SavedDevice,
}

/// A device model's own state, by kind (vsock connections are not saved: restore resets them).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum SavedDevice {
    Block(BlockState),
    Net(NetState),
    Vsock(VsockState),
    /// Snapshot format 5 on (older snapshots have no balloon).
    Balloon(BalloonState),
}

impl SavedVirtio {
    /// What kind of device this is, as status and logs describe it.
    pub fn kind(&self) -> VirtioKind {
        match &self.device {
            SavedDevice::Block(s) => VirtioKind::Block {
                path: s.path.clone(),
                read_only: s.read_only,
                id: s.id.clone(),
            },
            SavedDevice::Net(s) => VirtioKind::Net {
                tap: s.tap.clone(),
                mac: s.mac,
            },
            SavedDevice::Vsock(s) => VirtioKind::Vsock {
                config: s.config.clone(),
            },
            SavedDevice::Balloon(s) => VirtioKind::Balloon { config: s.config },
        }
    }
}

/// Host resources that replace the saved ones on restore (a clone's own copies).
#[derive(Debug, Clone, Default)]
pub struct DeviceOverrides {
    /// Per saved disk, in order: a replacement path (None keeps the saved one).
    pub disks: Vec<Option<PathBuf>>,
    /// Per saved network device, in order: a replacement TAP and/or MAC.
    pub nets: Vec<Option<NetOverride>>,
    /// A new vsock identity (CID and/or hybrid socket path).
    pub vsock: Option<VsockOverride>,
    /// Per saved disk, in order: new I/O limits (None keeps the saved ones).
    pub disk_rate_limiters: Vec<Option<RateLimiterConfig>>,
    /// Per saved network device, in order: new RX/TX limits (None keeps the saved ones).
    pub net_rate_limiters: Vec<Option<NetRateLimits>>,
    /// The MMDS for restored interfaces that served one.
    pub mmds: Option<devices::mmds::SharedMmds>,
}

/// A network device's RX and TX limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetRateLimits {
    pub rx: RateLimiterConfig,
    pub tx: RateLimiterConfig,
}

#[derive(Debug, Clone)]
pub struct NetOverride {
    pub tap: String,
    /// An already-open TAP (`restore --net fd=N`) used instead of opening `tap`.
    pub fd: Option<std::os::fd::RawFd>,
    pub mac: Option<[u8; 6]>,
}

#[derive(Debug, Clone, Default)]
pub struct VsockOverride {
    pub cid: Option<u64>,
    pub uds: Option<PathBuf>,
}

impl DevicesState {
    /// Checks the slots before anything is built from them: each MMIO window inside the device
    /// area, aligned and not shared; each IRQ a device IRQ and not shared; at most one vsock
    /// device. The error names the first offender.
    pub fn check_slots(&self) -> Result<(), String> {
        let mut windows = std::collections::BTreeSet::new();
        let mut irqs = std::collections::BTreeSet::new();
        let (mut vsock_devices, mut balloons) = (0, 0);
        for (index, device) in self.virtio.iter().enumerate() {
            let base = device.mmio_base;
            let in_area = base >= VIRTIO_MMIO_BASE
                && base
                    .checked_add(MMIO_WINDOW_SIZE)
                    .is_some_and(|end| end <= IOAPIC_ADDR);
            if !in_area || base % MMIO_WINDOW_SIZE != 0 || !windows.insert(base) {
                return Err(format!(
                    "virtio device {index}: MMIO window {base:#x} is outside the device area, \
                     unaligned or shared"
                ));
            }
            if !(FIRST_DEVICE_IRQ..IOAPIC_PINS).contains(&device.irq) || !irqs.insert(device.irq) {
                return Err(format!(
                    "virtio device {index}: IRQ {} is not a free device IRQ ({FIRST_DEVICE_IRQ} \
                     to {})",
                    device.irq,
                    IOAPIC_PINS - 1
                ));
            }
            vsock_devices += usize::from(matches!(device.device, SavedDevice::Vsock(_)));
            balloons += usize::from(matches!(device.device, SavedDevice::Balloon(_)));
        }
        if vsock_devices > 1 {
            return Err(format!("{vsock_devices} vsock devices (at most one)"));
        }
        if balloons > 1 {
            return Err(format!("{balloons} balloon devices (at most one)"));
        }
        Ok(())
    }
}

impl Devices {
    /// Every device's state; call with the vCPUs and the event loop paused.
    pub fn save(&self) -> DevicesState {
        DevicesState {
            serial: lock(&self.serial).save(),
            virtio: self
                .virtio
                .iter()
                .map(|slot| SavedVirtio {
                    irq: slot.irq,
                    mmio_base: slot.mmio_base,
                    transport: lock(&slot.transport).save(),
                    device: match &slot.model {
                        VirtioModel::Block(d) => SavedDevice::Block(lock(d).save()),
                        VirtioModel::Net(d) => SavedDevice::Net(lock(d).save()),
                        VirtioModel::Vsock(d) => SavedDevice::Vsock(lock(d).save()),
                        VirtioModel::Balloon(d) => SavedDevice::Balloon(lock(d).save()),
                    },
                })
                .collect(),
        }
    }
}

impl DeviceManager {
    /// Builds the device set of `state` in `vm`, each device in its saved slot with its saved
    /// transport, host resources from the state unless `overrides` replaces them.
    pub fn restore(
        vm: &Vm,
        mem: &GuestMemory,
        console_out: Box<dyn Write + Send>,
        exit: Arc<ExitSink>,
        state: &DevicesState,
        overrides: &DeviceOverrides,
        metrics: vmm_metrics::VmMetrics,
    ) -> Result<Self, DeviceError> {
        let mut manager =
            Self::with_legacy_devices(vm, console_out, exit, Some(&state.serial), metrics)?;
        let (mut disk_index, mut net_index) = (0usize, 0usize);
        for saved in &state.virtio {
            let slot = Some(RestoreSlot {
                irq: saved.irq,
                base: saved.mmio_base,
                transport: &saved.transport,
            });
            match &saved.device {
                SavedDevice::Block(device) => {
                    let path = overrides.disks.get(disk_index).cloned().flatten();
                    let rate_limiter = overrides
                        .disk_rate_limiters
                        .get(disk_index)
                        .copied()
                        .flatten();
                    disk_index += 1;
                    let shown = path.clone().unwrap_or_else(|| device.path.clone());
                    let args = BlockConstructorArgs { path, rate_limiter };
                    let block =
                        Block::restore(args, device).map_err(|e| DeviceError::Block(shown, e))?;
                    manager.place_block(vm, mem, block, slot)?;
                }
                SavedDevice::Net(device) => {
                    let over = overrides.nets.get(net_index).cloned().flatten();
                    let limits = overrides
                        .net_rate_limiters
                        .get(net_index)
                        .copied()
                        .flatten();
                    net_index += 1;
                    let args = NetConstructorArgs {
                        tap: over.as_ref().map(|o| o.tap.clone()),
                        fd: over.as_ref().and_then(|o| o.fd),
                        mac: over.and_then(|o| o.mac),
                        rx_rate_limiter: limits.map(|l| l.rx),
                        tx_rate_limiter: limits.map(|l| l.tx),
                        mmds: overrides.mmds.clone(),
                    };
                    let tap = args.tap.clone().unwrap_or_else(|| device.tap.clone());
                    let net = Net::restore(args, device).map_err(|e| DeviceError::Net(tap, e))?;
                    manager.place_net(vm, mem, net, slot)?;
                }
                SavedDevice::Vsock(device) => {
                    let args = VsockConstructorArgs {
                        guest_cid: overrides.vsock.as_ref().and_then(|o| o.cid),
                        uds_path: overrides.vsock.as_ref().and_then(|o| o.uds.clone()),
                    };
                    let vsock = Vsock::restore(args, device).map_err(DeviceError::Vsock)?;
                    manager.place_vsock(vm, mem, vsock, slot)?;
                }
                SavedDevice::Balloon(device) => {
                    let balloon = Balloon::restore(BalloonConstructorArgs, device)
                        .map_err(DeviceError::Balloon)?;
                    manager.place_balloon(vm, mem, balloon, slot)?;
                }
            }
        }
        Ok(manager)
    }
}
