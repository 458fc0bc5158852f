//! The Firecracker-compatible API (docs/firecracker.md): Firecracker's endpoints, bodies,
//! status codes and `{"fault_message": …}` errors, served on dormouse's control socket beside
//! its own `/v1/…` routes.
//!
//! [`FcVmm`] holds the pre-boot configuration (`preboot`), starts or loads the VM through a
//! [`Launcher`], and implements `vmm_api::VmControl` (`control`), so `vmm_api::ApiSocket` serves
//! it unchanged: dormouse's routes go to the VM, Firecracker's paths to `router`. `types` are
//! the wire bodies, `checks` what dormouse cannot honour (a 400 saying why),
//! `snapshot_files` how Firecracker's snapshot paths map onto a snapshot directory,
//! `metrics_file` Firecracker's metrics file.

// Requests are hostile input: outside tests, nothing may unwrap or expect.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod balloon;
mod checks;
mod control;
mod error;
mod front;
pub mod metrics_file;
mod preboot;
pub mod router;
mod snapshot_files;
pub mod types;

#[cfg(test)]
mod tests;

pub use error::FcError;
pub use front::{FcSettings, FcVmm, Launcher, LogControl, FIRECRACKER_VERSION};
pub use snapshot_files::{DeviceIds, IDS_FILE};
