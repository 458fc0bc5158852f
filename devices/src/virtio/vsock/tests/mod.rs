//! Tests of the vsock device, above the unit tests inside each module.

mod connection;
mod device;
pub mod driver;
mod fuzz;
mod muxer;
mod support;
