//! What dormouse cannot honour in Firecracker's bodies: each such field or value is a 400 that
//! says so and why, never silently dropped.

use super::error::FcError;
use super::types::{Drive, MachineConfig, NetworkInterface, SnapshotLoadParams};

/// The longest drive id: it becomes the disk's virtio serial (20 bytes in the virtio spec),
/// which is how a restored VM's drives are found again by id.
pub const MAX_DRIVE_ID: usize = 20;

pub fn machine_config(config: &MachineConfig) -> Result<(), FcError> {
    if config.vcpu_count == 0 || config.vcpu_count > vmm::vm::MAX_VCPUS {
        return Err(FcError::bad(format!(
            "Invalid vCPU count: {} (1 to {})",
            config.vcpu_count,
            vmm::vm::MAX_VCPUS
        )));
    }
    if config.mem_size_mib == 0 {
        return Err(FcError::bad("Invalid memory size: 0 MiB"));
    }
    if config.smt {
        return Err(FcError::unsupported(
            "smt: true",
            "dormouse gives every vCPU its own core in the CPU topology it reports",
        ));
    }
    if let Some(template) = &config.cpu_template {
        if template != "None" {
            return Err(FcError::unsupported(
                format!("cpu_template {template:?}"),
                "dormouse passes the host's CPUID through (only \"None\" is accepted)",
            ));
        }
    }
    if let Some(pages) = &config.huge_pages {
        if pages != "None" {
            return Err(FcError::unsupported(
                format!("huge_pages {pages:?}"),
                "guest memory is backed by 4 KiB pages (only \"None\" is accepted)",
            ));
        }
    }
    Ok(())
}

pub fn drive(drive: &Drive) -> Result<(), FcError> {
    if drive.drive_id.is_empty() || drive.drive_id.len() > MAX_DRIVE_ID {
        return Err(FcError::unsupported(
            format!("drive_id {:?}", drive.drive_id),
            format!("a drive id must be 1 to {MAX_DRIVE_ID} bytes: it is the disk's virtio serial"),
        ));
    }
    if drive.socket.is_some() {
        return Err(FcError::unsupported(
            "socket (vhost-user-block)",
            "dormouse's disks are virtio-blk devices backed by a host file",
        ));
    }
    if drive.path_on_host.is_none() {
        return Err(FcError::bad(
            "path_on_host is required for a virtio-block drive",
        ));
    }
    if let Some(engine) = &drive.io_engine {
        if engine != "Sync" {
            return Err(FcError::unsupported(
                format!("io_engine {engine:?}"),
                "dormouse's virtio-blk has one (synchronous) I/O engine",
            ));
        }
    }
    if let Some(cache) = &drive.cache_type {
        if cache != "Unsafe" && cache != "Writeback" {
            return Err(FcError::bad(format!(
                "cache_type {cache:?}: expected Unsafe or Writeback"
            )));
        }
    }
    Ok(())
}

pub fn network_interface(iface: &NetworkInterface) -> Result<(), FcError> {
    if iface.mtu.is_some() {
        return Err(FcError::unsupported(
            "mtu",
            "dormouse's virtio-net does not offer VIRTIO_NET_F_MTU",
        ));
    }
    if let Some(mac) = &iface.guest_mac {
        if vmm::options::parse_mac(mac).is_none() {
            return Err(FcError::bad(format!(
                "guest_mac {mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"
            )));
        }
    }
    Ok(())
}

pub fn snapshot_load(params: &SnapshotLoadParams) -> Result<(), FcError> {
    // dormouse always advances kvmclock by the time the snapshot slept (Firecracker's `true`);
    // an explicit `false` asks for the one behaviour it lacks.
    if params.clock_realtime == Some(false) {
        return Err(FcError::unsupported(
            "clock_realtime: false",
            "a restored guest's clock always catches up with the wall clock in dormouse; \
             leave it out or set it to true",
        ));
    }
    if let Some(pages) = &params.huge_pages {
        if pages != "None" && pages != "Snapshot" {
            return Err(FcError::unsupported(
                format!("huge_pages {pages:?}"),
                "guest memory is backed by 4 KiB pages",
            ));
        }
    }
    Ok(())
}
