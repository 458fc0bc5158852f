//! One shape for saving and restoring a device (after Firecracker's `snapshot::Persist`).
//!
//! Every device with state a snapshot must keep implements [`Persist`], with its state type in a
//! `persist.rs` beside the device:
//!
//! | device | `State` | `ConstructorArgs` (host resources) |
//! |---|---|---|
//! | `legacy::SerialConsole` | `SerialState` | `SerialConstructorArgs`: irq line, console writer |
//! | `virtio::mmio::MmioTransport` | `MmioTransportState` | `MmioTransportArgs`: device, memory, interrupt |
//! | `virtio::block::Block` | `BlockState` | `BlockConstructorArgs`: optional replacement image |
//! | `virtio::net::Net` (on a TAP) | `NetState` | `NetConstructorArgs`: optional replacement TAP / MAC |
//! | `virtio::vsock::Vsock` | `VsockState` | `VsockConstructorArgs`: optional replacement CID / UDS |
//! | `virtio::balloon::Balloon` | `BalloonState` | `BalloonConstructorArgs`: none |
//!
//! The i8042 has no `Persist` (nor has it in Firecracker's snapshots): a restored VM gets a new
//! one, and what it would lose does not matter. Its control byte starts as the one Linux's driver
//! leaves after its probe (keyboard interrupt on, no mouse port, no translation); what else it
//! holds lives for one command or one key press (an answer not yet read, a command waiting for
//! its parameter), which a driver retries after its timeout.
//!
//! A virtio device is two objects, each persisted on its own: the device model (its own
//! configuration: disk, TAP, vsock CID, ...) and its `MmioTransport` (register state and queues).
//! Restore order matters: build the device first, then restore the transport over it, which
//! re-activates the device with the restored queues when the driver had it running.
//!
//! Intended use by the VMM's device manager (one saved entry per device, no side tables):
//!
//! ```ignore
//! // save, with the vCPUs and the event loop paused
//! let saved = SavedBlock { device: block.lock()?.save(), transport: transport.lock()?.save(), irq, base };
//! // restore: construction, nothing half-built on error
//! let block = Arc::new(Mutex::new(Block::restore(BlockConstructorArgs { path: override_path }, &saved.device)?));
//! let transport = MmioTransport::restore(
//!     MmioTransportArgs { device: block.clone(), mem: mem.clone(), interrupt },
//!     &saved.transport,
//! )?;
//! ```
//!
//! Rules every implementation follows:
//! - `save` is called with the vCPUs and the event loop paused; it cannot fail.
//! - `restore` is construction: it validates `state` (which is untrusted: it comes from a file)
//!   and returns a complete device or an error, never a half-built device and never a panic.
//! - `State` is plain serde data. Its serialised shape is part of the snapshot format: changing
//!   it needs a format bump and a conversion (see `docs/snapshot-compat.md`).

/// A device that can be saved to a `State` and built again from it plus host resources.
pub trait Persist: Sized {
    /// What a snapshot keeps of the device.
    type State;
    /// The host resources (file descriptors, paths, interrupt lines, guest memory, overrides)
    /// that are not in the state and that restore needs to build the device.
    type ConstructorArgs;
    /// Why a state could not be restored.
    type Error: std::error::Error;

    /// The device's state; call with the vCPUs and the event loop paused.
    fn save(&self) -> Self::State;

    /// A new device from `state` and the host resources in `args`; on error nothing is left
    /// half-built.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
