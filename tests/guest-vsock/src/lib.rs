//! The guest side of dormouse's vsock end-to-end tests.
//!
//! `dormouse-vsock-test` (src/main.rs) runs inside the guest as one long-lived process: on a
//! kernel whose ring 0 is emulated every syscall and fork is expensive, so it serves every test
//! case from threads of a single process. The host-side tests link this library for the wire
//! protocol (`protocol`) and, on the vhost-vsock datapath, for raw AF_VSOCK sockets (`socket`).

pub mod protocol;
pub mod server;
pub mod socket;

pub use socket::{VsockListener, VsockStream};
