//! The VM being configured before `InstanceStart`: Firecracker's pre-boot resources, kept as
//! the client sent them (so `GET /vm/config` echoes them) and turned into a [`VmConfig`] at
//! start.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use devices::mmds::{MmdsNetConfig, SharedMmds};
use devices::virtio::block::BlockConfig;
use devices::virtio::net::NetConfig;
use devices::virtio::vsock::{BackendChoice, VsockConfig};
use vmm::{Console, SeccompLevel, VmConfig};

use super::checks;
use super::error::FcError;
use super::types::{
    Balloon, BootSource, Drive, FullVmConfiguration, MachineConfig, MachineConfigUpdate,
    MmdsConfig, NetworkInterface, Vsock,
};

#[derive(Clone, Debug, Default)]
pub struct PreBoot {
    pub boot_source: Option<BootSource>,
    pub machine: MachineConfig,
    /// In the order first PUT; a PUT of a known id replaces it in place (as Firecracker).
    pub drives: Vec<Drive>,
    pub nets: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
    pub balloon: Option<Balloon>,
    /// `PUT /mmds/config`: which interfaces serve the MMDS.
    pub mmds: Option<MmdsConfig>,
    /// Anything was configured: Firecracker then refuses to load a snapshot.
    pub touched: bool,
}

/// A path that names an existing regular file (what Firecracker's open at PUT time checks).
fn readable_file(path: &str, what: &str) -> Result<(), FcError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(FcError::bad(format!("{what}: {path:?} is not a file"))),
        Err(e) => Err(FcError::bad(format!("{what}: {path:?}: {e}"))),
    }
}

fn upsert<T>(list: &mut Vec<T>, item: T, same: impl Fn(&T) -> bool) {
    match list.iter_mut().find(|existing| same(existing)) {
        Some(existing) => *existing = item,
        None => list.push(item),
    }
}

impl PreBoot {
    pub fn set_boot_source(&mut self, source: BootSource) -> Result<(), FcError> {
        // Firecracker opens these files at the PUT; a missing one is reported here too.
        readable_file(
            &source.kernel_image_path,
            "The kernel file cannot be opened",
        )?;
        if let Some(initrd) = &source.initrd_path {
            readable_file(initrd, "The initrd file cannot be opened")?;
        }
        self.boot_source = Some(source);
        self.touched = true;
        Ok(())
    }

    pub fn set_machine(&mut self, config: MachineConfig) -> Result<(), FcError> {
        checks::machine_config(&config)?;
        self.machine = config;
        self.touched = true;
        Ok(())
    }

    pub fn update_machine(&mut self, update: MachineConfigUpdate) -> Result<(), FcError> {
        let current = self.machine.clone();
        let next = MachineConfig {
            vcpu_count: update.vcpu_count.unwrap_or(current.vcpu_count),
            mem_size_mib: update.mem_size_mib.unwrap_or(current.mem_size_mib),
            smt: update.smt.unwrap_or(current.smt),
            track_dirty_pages: update
                .track_dirty_pages
                .unwrap_or(current.track_dirty_pages),
            cpu_template: update.cpu_template.or(current.cpu_template),
            huge_pages: update.huge_pages.or(current.huge_pages),
        };
        self.set_machine(next)
    }

    pub fn set_drive(&mut self, drive: Drive) -> Result<(), FcError> {
        checks::drive(&drive)?;
        if let Some(path) = &drive.path_on_host {
            readable_file(
                path,
                "Unable to create the block device: cannot open its file",
            )?;
        }
        if drive.is_root_device
            && self
                .drives
                .iter()
                .any(|d| d.is_root_device && d.drive_id != drive.drive_id)
        {
            return Err(FcError::bad("A root block device already exists!"));
        }
        let id = drive.drive_id.clone();
        upsert(&mut self.drives, drive, |d| d.drive_id == id);
        self.touched = true;
        Ok(())
    }

    pub fn set_net(&mut self, iface: NetworkInterface) -> Result<(), FcError> {
        checks::network_interface(&iface)?;
        let id = iface.iface_id.clone();
        if self
            .nets
            .iter()
            .any(|n| n.iface_id != id && n.host_dev_name == iface.host_dev_name)
        {
            return Err(FcError::bad(format!(
                "The host device {} is already in use by another interface",
                iface.host_dev_name
            )));
        }
        upsert(&mut self.nets, iface, |n| n.iface_id == id);
        self.touched = true;
        Ok(())
    }

    pub fn set_vsock(&mut self, vsock: Vsock) -> Result<(), FcError> {
        // The CID's range is the device's to check; parse it the way `--vsock cid=N` is.
        format!("cid={}", vsock.guest_cid)
            .parse::<VsockConfig>()
            .map_err(|e| FcError::bad(format!("Invalid vsock configuration: {e}")))?;
        if vsock.uds_path.is_empty() {
            return Err(FcError::bad(
                "Invalid vsock configuration: uds_path is empty",
            ));
        }
        self.vsock = Some(vsock);
        self.touched = true;
        Ok(())
    }

    pub fn set_balloon(&mut self, balloon: Balloon) -> Result<(), FcError> {
        super::balloon::config(&balloon)?;
        self.balloon = Some(balloon);
        self.touched = true;
        Ok(())
    }

    /// `PUT /mmds/config`, checked as Firecracker does (its messages).
    pub fn set_mmds_config(&mut self, config: MmdsConfig) -> Result<(), FcError> {
        if config.network_interfaces.is_empty() {
            return Err(FcError::bad(
                "The list of network interface IDs that allow forwarding MMDS requests is empty.",
            ));
        }
        mmds_ipv4(&config)?;
        if config
            .network_interfaces
            .iter()
            .any(|id| !self.nets.iter().any(|n| &n.iface_id == id))
        {
            return Err(FcError::bad(
                "The list of network interface IDs provided contains at least one ID that does \
                 not correspond to any existing network interface.",
            ));
        }
        self.mmds = Some(config);
        self.touched = true;
        Ok(())
    }

    /// Applies a `--config-file` document, section by section, as the matching PUTs would.
    pub fn apply(&mut self, document: FullVmConfiguration) -> Result<(), FcError> {
        let unsupported = [
            (
                "cpu-config",
                document.cpu_config.is_some(),
                "dormouse passes the host's CPUID through",
            ),
            (
                "memory-hotplug",
                document.memory_hotplug.is_some(),
                "dormouse has no memory hot-plug",
            ),
            (
                "pmem",
                document.pmem.is_some(),
                "dormouse has no virtio-pmem device",
            ),
            (
                "entropy",
                document.entropy.is_some(),
                "dormouse has no virtio-rng device",
            ),
        ];
        if let Some((what, _, why)) = unsupported.iter().find(|(_, present, _)| *present) {
            return Err(FcError::unsupported(format!("the {what:?} section"), *why));
        }
        if let Some(source) = document.boot_source {
            self.set_boot_source(source)?;
        }
        if let Some(machine) = document.machine_config {
            self.set_machine(machine)?;
        }
        for drive in document.drives {
            self.set_drive(drive)?;
        }
        for iface in document.network_interfaces {
            self.set_net(iface)?;
        }
        if let Some(vsock) = document.vsock {
            self.set_vsock(vsock)?;
        }
        if let Some(balloon) = document.balloon {
            self.set_balloon(balloon)?;
        }
        // After the interfaces it names.
        if let Some(mmds) = document.mmds_config {
            self.set_mmds_config(mmds)?;
        }
        Ok(())
    }

    /// What `GET /vm/config` answers.
    pub fn document(&self) -> FullVmConfiguration {
        FullVmConfiguration {
            boot_source: self.boot_source.clone(),
            drives: self.drives.clone(),
            machine_config: Some(self.machine.clone()),
            network_interfaces: self.nets.clone(),
            vsock: self.vsock.clone(),
            balloon: self.balloon.clone(),
            mmds_config: self.mmds.clone(),
            ..FullVmConfiguration::default()
        }
    }

    /// Drive ids in the guest's disk order: the root device first (it is /dev/vda), then the
    /// others in the order they were added, as Firecracker attaches them.
    pub fn disk_order(&self) -> Vec<&Drive> {
        let root = self.drives.iter().filter(|d| d.is_root_device);
        root.chain(self.drives.iter().filter(|d| !d.is_root_device))
            .collect()
    }

    /// The VM to build; the interfaces named by `PUT /mmds/config` serve `mmds`.
    pub fn vm_config(
        &self,
        console: Console,
        seccomp: SeccompLevel,
        mmds: &SharedMmds,
    ) -> Result<VmConfig, FcError> {
        let source = self
            .boot_source
            .as_ref()
            .ok_or_else(|| FcError::bad("Cannot start microvm without kernel configuration."))?;
        let mut config = VmConfig::new(&source.kernel_image_path);
        config.initrd = source.initrd_path.as_ref().map(PathBuf::from);
        config.vcpus = self.machine.vcpu_count;
        config.mem_mib = self.machine.mem_size_mib;
        config.dirty_log = self.machine.track_dirty_pages;
        config.console = console;
        config.seccomp = seccomp;
        let mut cmdline = source
            .boot_args
            .clone()
            .unwrap_or_else(|| vmm::vm::DEFAULT_CMDLINE.to_string());
        for drive in self.disk_order() {
            let read_only = drive.is_read_only.unwrap_or(false);
            if drive.is_root_device {
                // As Firecracker: root= by PARTUUID when given, and ro/rw from the drive.
                let root = match &drive.partuuid {
                    Some(uuid) => format!("PARTUUID={uuid}"),
                    None => "/dev/vda".to_string(),
                };
                let mode = if read_only { "ro" } else { "rw" };
                cmdline.push_str(&format!(" root={root} {mode}"));
            }
            config.disks.push(BlockConfig {
                path: drive
                    .path_on_host
                    .clone()
                    .map(PathBuf::from)
                    .unwrap_or_default(),
                read_only,
                id: Some(drive.drive_id.clone()),
                rate_limiter: drive.rate_limiter.map(Into::into).unwrap_or_default(),
            });
        }
        config.cmdline = Some(cmdline);
        let mmds_ipv4 = self.mmds.as_ref().map(mmds_ipv4).transpose()?;
        for iface in &self.nets {
            let serves_mmds = self
                .mmds
                .as_ref()
                .is_some_and(|m| m.network_interfaces.contains(&iface.iface_id));
            config.nets.push(NetConfig {
                tap: iface.host_dev_name.clone(),
                fd: None,
                mac: iface.guest_mac.as_deref().and_then(vmm::options::parse_mac),
                rx_rate_limiter: iface.rx_rate_limiter.map(Into::into).unwrap_or_default(),
                tx_rate_limiter: iface.tx_rate_limiter.map(Into::into).unwrap_or_default(),
                mmds: mmds_ipv4.filter(|_| serves_mmds).map(|ipv4| MmdsNetConfig {
                    ipv4,
                    mmds: mmds.clone(),
                }),
            });
        }
        config.vsock = self.vsock.as_ref().map(|v| VsockConfig {
            guest_cid: v.guest_cid,
            uds_path: Some(PathBuf::from(&v.uds_path)),
            // The hybrid socket is served by the userspace datapath only.
            backend: BackendChoice::Userspace,
        });
        if let Some(balloon) = &self.balloon {
            let device = super::balloon::config(balloon)?;
            vmm::device_manager::check_balloon_target(device.target_mib, config.mem_mib)
                .map_err(FcError::bad)?;
            config.balloon = Some(device);
        }
        Ok(config)
    }
}

/// The MMDS address: 169.254.169.254 unless configured; link-local, and neither the first nor
/// the last /24 of 169.254/16 (reserved by RFC 3927), as Firecracker requires.
pub fn mmds_ipv4(config: &MmdsConfig) -> Result<Ipv4Addr, FcError> {
    let Some(text) = &config.ipv4_address else {
        return Ok(devices::mmds::DEFAULT_IPV4);
    };
    let ip: Ipv4Addr = text
        .parse()
        .map_err(|e| FcError::bad(format!("Invalid MMDS IPv4 address {text:?}: {e}")))?;
    match ip.octets() {
        [169, 254, 0, _] | [169, 254, 255, _] => {}
        [169, 254, _, _] => return Ok(ip),
        _ => {}
    }
    Err(FcError::bad("The MMDS IPv4 address is not link local."))
}
