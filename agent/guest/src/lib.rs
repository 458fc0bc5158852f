//! dormouse guest agent: the gRPC server that runs inside the microVM (as
//! PID 1 or under an init).
//!
//! * [`server::AgentService`] implements `dormouse.agent.v1.Agent` (crate `agent-proto`,
//!   re-exported as [`proto`]); [`listen::serve`] runs it on vsock, a Unix socket or TCP.
//! * [`init`] holds the PID 1 duties ([`network`]: eth0 and the resolver), [`ready`] the
//!   readiness notification.
//!
//! The host client is the crate `agent-client`; it does not depend on this one.

// Guest memory, snapshot files and API requests are hostile input: outside tests, nothing may
// unwrap or expect (a panic would end the VM). Tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cpu_quirk;
pub mod init;
pub mod listen;
pub mod network;
pub mod ready;
pub mod server;

/// The protocol: generated types and shared constants (crate `agent-proto`).
pub use agent_proto as proto;
