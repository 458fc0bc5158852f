//! The vsock device's saved state and its `Persist` implementation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::config::{validate_cid, Datapath, VsockConfig};
use super::device::{Vsock, VsockError};
use super::muxer::Muxer;
use crate::persist::Persist;

/// What a snapshot keeps. Connections are not saved: restore resets them and tells the guest
/// through VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub config: VsockConfig,
    pub datapath: Datapath,
    pub avail_features: u64,
    pub acked_features: u64,
    /// The next host-side port for host-initiated connections. A restored device goes on from
    /// here: the guest may still hold (reset, not yet closed) sockets of the connections open at
    /// snapshot time, and a new connection on one of their ports would be refused.
    pub next_local_port: Option<u32>,
}

/// Host resources of a restored vsock device: each `None` keeps what the snapshot recorded, so
/// a snapshot is also a template for clones with their own CID and socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VsockConstructorArgs {
    /// A different guest CID.
    pub guest_cid: Option<u64>,
    /// A different path for the hybrid Unix socket.
    pub uds_path: Option<PathBuf>,
}

impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs = VsockConstructorArgs;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            config: self.config.clone(),
            datapath: self.datapath,
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            next_local_port: self.muxer.as_ref().map(Muxer::next_local_port),
        }
    }

    /// Rebuilds the device from a snapshot. The guest learns about the lost connections from a
    /// transport-reset event, delivered once the transport re-activated the device.
    fn restore(args: VsockConstructorArgs, state: &VsockState) -> Result<Self, VsockError> {
        let mut config = state.config.clone();
        if let Some(cid) = args.guest_cid {
            config.guest_cid = cid;
        }
        if args.uds_path.is_some() {
            config.uds_path = args.uds_path;
        }
        validate_cid(config.guest_cid)?;
        let mut dev = Self::new(config)?;
        if dev.datapath != state.datapath {
            tracing::warn!(
                saved = ?state.datapath,
                now = ?dev.datapath,
                "vsock: restoring on a different datapath"
            );
        }
        dev.acked_features = state.acked_features & dev.avail_features;
        dev.pending_transport_reset = true;
        if let (Some(muxer), Some(port)) = (dev.muxer.as_mut(), state.next_local_port) {
            muxer.set_next_local_port(port);
        }
        Ok(dev)
    }
}
