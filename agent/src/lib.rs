//! dormouse guest agent: the gRPC server that runs inside the microVM (as
//! PID 1 or under an init) and the host-side client that talks to it.
//!
//! * [`server::AgentService`] implements `dormouse.agent.v1.Agent`
//!   (`proto/dormouse/agent/v1/agent.proto`); [`listen::serve`] runs it on
//!   vsock, a Unix socket or TCP.
//! * [`client::AgentClient`] is the typed host client.
//! * [`init`] holds the PID 1 duties, [`ready`] the readiness notification.

// Guest memory, snapshot files and API requests are hostile input: outside tests, nothing may
// unwrap or expect (a panic would end the VM). Tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod client;
pub mod cpu_quirk;
pub mod init;
pub mod listen;
pub mod ready;
pub mod server;

pub mod proto {
    //! Generated from `proto/dormouse/agent/v1/agent.proto`.
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("dormouse.agent.v1");
}
