//! How a sandbox's last start spent its time.

use std::time::Duration;

/// Where the time of a start (create, fork or wake) went. `vm_start` is host work (building or
/// restoring the VM until its vCPUs run); `agent_ready` is mostly guest work (booting, or
/// resuming and answering the first connection and Ping); `set_time` is one agent round trip.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartTimings {
    pub vm_start: Duration,
    pub agent_ready: Duration,
    pub set_time: Duration,
}

impl StartTimings {
    pub fn total(&self) -> Duration {
        self.vm_start + self.agent_ready + self.set_time
    }
}
