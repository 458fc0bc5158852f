//! The dormouse guest agent's protocol, shared by the guest agent (crate `agent`) and the host
//! client (crate `agent-client`):
//!
//! * the gRPC API `dormouse.agent.v1.Agent`, generated from `dormouse/agent/v1/agent.proto`
//!   (message types at the crate root, [`agent_client`] and [`agent_server`] stubs);
//! * what both sides must agree on: the vsock ports ([`AGENT_VSOCK_PORT`],
//!   [`AGENT_READY_PORT`]), the message size [`limits`], and the glibc setting that keeps user
//!   space off AVX when the guest kernel does not save its state ([`NO_AVX_TUNABLE`]).
//!
//! Nothing here runs on either side: no server, no client logic.

// Guest memory, snapshot files and API requests are hostile input: outside tests, nothing may
// unwrap or expect (a panic would end the VM). Tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod limits;

mod generated {
    //! Generated from `dormouse/agent/v1/agent.proto`.
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("dormouse.agent.v1");
}

pub use generated::*;

/// The vsock port the agent serves gRPC on (guest side, VMADDR_CID_ANY).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The host vsock port (CID 2) the agent announces itself on: `READY <version>\n`.
pub const AGENT_READY_PORT: u32 = 1023;

/// glibc tunables that turn off its AVX code paths (glibc >= 2.33 names). The agent sets them
/// when the guest kernel does not preserve AVX state; a host booting such a guest may pass the
/// same value on the kernel command line so the agent need not re-execute itself.
pub const NO_AVX_TUNABLE: &str =
    "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX_Fast_Unaligned_Load,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ";
