//! Per-VM counters and their two outputs (docs/metrics.md): Firecracker-style JSON lines with
//! deltas since the previous flush (`json`), and Prometheus text with cumulative counters
//! (`VmMetrics::prometheus_text`). Both read the same counters.
//!
//! Counters are `prometheus` crate counters: an increment is one relaxed atomic add on a
//! handle the device or thread got at construction (no lock, no allocation, no lookup per
//! event), because a guest can trigger millions of them.

// Guest-triggered paths increment these counters: outside tests nothing may panic.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod groups;
mod handles;
pub mod json;
mod registry;

pub use handles::{
    ApiMetrics, BlockMetrics, Field, MmdsMetrics, NetMetrics, SnapshotMetrics, VcpuMetrics,
    VsockMetrics,
};
/// The handles' counter type (one atomic add per increment).
pub use prometheus::IntCounter;
pub use registry::{MetricsError, VmMetrics, PROMETHEUS_CONTENT_TYPE};

#[cfg(test)]
mod tests;
