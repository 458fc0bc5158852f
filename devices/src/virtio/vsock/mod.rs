//! virtio-vsock: one device, two datapaths.
//!
//! - Userspace (default without `/dev/vhost-vsock`): the device parses packets from the
//!   virtqueues and hands them to the `Muxer`, which runs one `Connection` state machine per
//!   stream and talks to host endpoints through pluggable backends: the Firecracker-compatible
//!   hybrid Unix socket (`UdsBackend`) and in-process tokio streams (`VsockHandle`).
//! - vhost-kernel (`VhostDatapath`): the kernel moves the RX/TX rings; the VMM keeps the event
//!   queue.
//!
//! Layering: `header`/`connection`/`muxer` are pure logic (no guest memory, no event manager)
//! and unit-tested on their own; `device` is the virtqueue and event-loop glue.

pub mod backend;
pub mod config;
pub mod connection;
pub mod defs;
pub mod device;
pub mod header;
pub mod muxer;
pub mod persist;
pub mod vhost_dp;

#[cfg(test)]
mod tests;

pub use backend::{VsockBackend, VsockHandle, VsockListener};
pub use config::{BackendChoice, ConfigError, Datapath, VsockConfig};
pub use device::{Vsock, VsockError};
pub use persist::{VsockConstructorArgs, VsockState};
