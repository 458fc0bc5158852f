//! The metrics thread of `dormouse firecracker`: every 60 s (Firecracker's period) it appends
//! a line to the metrics file, once one is configured (`--metrics-path`, `PUT /metrics`).

use std::sync::Arc;
use std::time::Duration;

use vmm::seccomp::ThreadKind;
use vmm::SeccompLevel;
use vmm_fc_api::FcVmm;

/// Firecracker writes its metrics every minute.
pub const PERIOD: Duration = Duration::from_secs(60);

pub fn spawn_flush_thread(front: Arc<FcVmm>, level: SeccompLevel) {
    let spawned = std::thread::Builder::new()
        .name("fc-metrics".into())
        .spawn(move || {
            if let Err(e) = vmm::seccomp::install(ThreadKind::Metrics, level) {
                tracing::error!("metrics thread: {e}");
                return;
            }
            loop {
                std::thread::sleep(PERIOD);
                if let Err(e) = front.flush_metrics_if_configured() {
                    tracing::warn!("metrics: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the metrics thread: {e}");
    }
}
