//! dormouse's VMM core, as a library: build, run, pause, snapshot and restore a microVM on KVM.
//! Synchronous (async waits only with the `async` feature); it knows nothing of the control
//! API's wire format, the sandbox library or the CLI, which are crates of their own
//! (`vmm-api`, `vmm-sandbox`, `dormouse`; see docs/architecture.md).
//!
//! A reader finds each concern in one place: `host` (what KVM we run on), `memory` (guest RAM),
//! `hypervisor` (the KVM boundary: VM and vCPUs), `boot` (x86_64 direct boot), `device_manager`
//! (buses, IRQs, devices), `event_loop` (the device thread), `vm` (lifecycle).

// Guest memory, snapshot files and API requests are hostile input: outside tests, nothing may
// unwrap or expect (a panic would end the VM). Tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod agent_ready;
pub mod boot;
pub mod console;
pub mod device_manager;
pub mod event_loop;
pub mod exit;
#[cfg(any(test, feature = "fault-injection"))]
pub mod fault;
pub mod host;
pub mod hypervisor;
pub mod memory;
pub mod memory_residency;
pub mod options;
pub mod reserved_ram;
pub mod seccomp;
pub mod thread_guard;
#[cfg(any(test, feature = "test-guests"))]
pub mod tiny_guest;
pub mod vm;

pub use hypervisor::vcpu::VmExit;
pub use seccomp::SeccompLevel;
pub use vm::{Console, LazyRestore, RestoreOptions, Vm, VmConfig, VmController, VmError};
/// The counters a VM counts into (`VmConfig::metrics`), re-exported for embedders.
pub use vmm_metrics as metrics;
