//! What `state.bin` holds for a VM ([`VmSnapshotState`]), the checks a restore makes on it, and
//! how older formats are read: format 3 and later are CBOR with named fields (fields added
//! later need `#[serde(default)]`); format 2 was positional `postcard` in an older shape, read
//! through the frozen copy in `v2` and converted (docs/snapshot-compat.md).

use serde::{Deserialize, Serialize};

use crate::device_manager::DevicesState;
use crate::hypervisor::state::{VcpuState, VmState};

use super::config::MAX_VCPUS;

/// Everything in `state.bin`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmSnapshotState {
    pub vcpu_count: u8,
    pub mem_mib: u64,
    pub cmdline: String,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

impl VmSnapshotState {
    /// Checks that the saved state is one this VMM could have written, and that it agrees with
    /// its manifest, before anything is built from it: vCPU count (within limits, the same in
    /// the manifest and in the state, one saved state each), memory size and layout, and each
    /// virtio device's slot (see [`DevicesState::check_slots`]). The error names the first
    /// disagreement.
    pub fn check_consistent(&self, manifest: &snapshot::Manifest) -> Result<(), String> {
        use crate::boot::layout::ram_ranges;

        let vcpus = self.vcpu_count;
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(format!("{vcpus} vCPUs (this VMM runs 1 to {})", MAX_VCPUS));
        }
        if manifest.vcpus != u32::from(vcpus) {
            return Err(format!(
                "the manifest says {} vCPUs, the state {vcpus}",
                manifest.vcpus
            ));
        }
        if self.vcpus.len() != usize::from(vcpus) {
            return Err(format!(
                "{} saved vCPU states for {vcpus} vCPUs",
                self.vcpus.len()
            ));
        }
        let mem_bytes = self
            .mem_mib
            .checked_mul(1 << 20)
            .filter(|b| *b == manifest.memory_size)
            .ok_or_else(|| {
                format!(
                    "the state has {} MiB of memory, the manifest {} bytes",
                    self.mem_mib, manifest.memory_size
                )
            })?;
        let expected: Vec<(u64, u64)> = ram_ranges(mem_bytes);
        let saved: Vec<(u64, u64)> = manifest
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        if saved != expected {
            return Err(format!(
                "memory regions {saved:x?} are not this VMM's layout for {} MiB ({expected:x?})",
                self.mem_mib
            ));
        }
        self.devices.check_slots()
    }
}

impl snapshot::SavedState for VmSnapshotState {
    fn from_postcard(version: u32, payload: &[u8]) -> Result<Self, String> {
        match version {
            2 => snapshot::decode_postcard::<v2::VmSnapshotState>(payload)?.into_current(),
            _ => Err(format!("no decoder for format {version}")),
        }
    }
}

/// The shape format 2 (dormouse 0.1, positional `postcard`) wrote, frozen: never edit these
/// types, since postcard reads fields by position. The component states they embed
/// (`VmState`, `VcpuState`, `SerialState`, `MmioTransportState`, `VsockState`, `BlockState`'s
/// fields) have not changed since; whoever changes one must freeze its format-2 shape here too.
mod v2 {
    use std::path::PathBuf;

    use devices::legacy::SerialState;
    use devices::virtio::block::BlockState;
    use devices::virtio::mmio::MmioTransportState;
    use devices::virtio::net::NetState;
    use devices::virtio::vsock::{VsockConfig, VsockState};
    use serde::Deserialize;

    use crate::device_manager::{DevicesState, SavedDevice, SavedVirtio as SavedVirtioNow};
    use crate::hypervisor::state::{VcpuState, VmState};

    #[derive(Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub(super) struct VmSnapshotState {
        pub(super) vcpu_count: u8,
        mem_mib: u64,
        cmdline: String,
        vm: VmState,
        vcpus: Vec<VcpuState>,
        serial: SerialState,
        pub(super) virtio: Vec<SavedVirtio>,
    }

    #[derive(Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub(super) struct SavedVirtio {
        kind: VirtioKind,
        irq: u32,
        mmio_base: u64,
        transport: MmioTransportState,
        /// Present for the vsock device only (checked on conversion).
        pub(super) vsock: Option<VsockState>,
    }

    #[derive(Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    enum VirtioKind {
        Block {
            path: PathBuf,
            read_only: bool,
            id: Option<String>,
        },
        Net {
            tap: String,
            mac: [u8; 6],
        },
        Vsock {
            #[allow(dead_code)] // the same config is in the vsock state
            config: VsockConfig,
        },
    }

    impl VmSnapshotState {
        /// Today's shape of the same state; a vsock device without its state (which no
        /// format-2 writer produced) is refused, not dropped from under the guest.
        pub(super) fn into_current(self) -> Result<super::VmSnapshotState, String> {
            let old = self;
            let virtio = old
                .virtio
                .into_iter()
                .enumerate()
                .map(|(index, saved)| {
                    let device = match (saved.kind, saved.vsock) {
                        (
                            VirtioKind::Block {
                                path,
                                read_only,
                                id,
                            },
                            _,
                        ) => SavedDevice::Block(BlockState {
                            path,
                            read_only,
                            id,
                            rate_limiter: Default::default(),
                        }),
                        (VirtioKind::Net { tap, mac }, _) => SavedDevice::Net(NetState {
                            tap,
                            mac,
                            rx_rate_limiter: Default::default(),
                            tx_rate_limiter: Default::default(),
                            mmds: None,
                        }),
                        (VirtioKind::Vsock { .. }, Some(state)) => SavedDevice::Vsock(state),
                        (VirtioKind::Vsock { .. }, None) => {
                            return Err(format!(
                                "virtio device {index}: vsock state missing for a vsock device"
                            ))
                        }
                    };
                    Ok(SavedVirtioNow {
                        irq: saved.irq,
                        mmio_base: saved.mmio_base,
                        transport: saved.transport,
                        device,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(super::VmSnapshotState {
                vcpu_count: old.vcpu_count,
                mem_mib: old.mem_mib,
                cmdline: old.cmdline,
                vm: old.vm,
                vcpus: old.vcpus,
                devices: DevicesState {
                    serial: old.serial,
                    virtio,
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::SavedState;

    /// The committed format-2 state of a Linux guest with blk, net and vsock.
    fn corpus_payload() -> Vec<u8> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/snapshot-corpus/v2/linux-devices/state.bin"
        );
        let bytes = std::fs::read(path).unwrap();
        // The 32-byte header (magic, version, lengths, CRCs) is the snapshot crate's business.
        bytes[32..].to_vec()
    }

    #[test]
    fn format_2_converts_to_typed_devices() {
        let state = VmSnapshotState::from_postcard(2, &corpus_payload()).unwrap();
        let kinds: Vec<&str> = state
            .devices
            .virtio
            .iter()
            .map(|d| match d.device {
                crate::device_manager::SavedDevice::Block(_) => "blk",
                crate::device_manager::SavedDevice::Net(_) => "net",
                crate::device_manager::SavedDevice::Vsock(_) => "vsock",
                crate::device_manager::SavedDevice::Balloon(_) => "balloon",
            })
            .collect();
        assert_eq!(kinds, ["blk", "net", "vsock"]);
    }

    /// Format 2 could say "vsock" without the vsock state (a side `Option`): refused, not
    /// dropped from under the guest. Trailing bytes and unknown versions are refused too.
    #[test]
    fn format_2_impossible_combinations_are_refused() {
        let mut old: v2::VmSnapshotState = postcard::from_bytes(&corpus_payload()).unwrap();
        let vsock = old.virtio.iter_mut().find(|d| d.vsock.is_some()).unwrap();
        vsock.vsock = None;
        let bytes = postcard::to_stdvec(&old).unwrap();
        let error = VmSnapshotState::from_postcard(2, &bytes).unwrap_err();
        assert!(error.contains("vsock state missing"), "{error}");

        let mut trailing = corpus_payload();
        trailing.push(0);
        assert!(VmSnapshotState::from_postcard(2, &trailing).is_err());
        assert!(VmSnapshotState::from_postcard(1, &corpus_payload()).is_err());
    }
}
