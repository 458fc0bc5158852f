//! Driver-side harness for measuring the VMM's own datapath cost: mock guest memory, split
//! queues filled the way a guest driver fills them, request submission, completion reaping, and
//! per-thread CPU accounting. Shared by this crate's benchmarks (`cargo bench -p
//! devices-bench-support`) and `dormouse bench io|vsock`, so both report the same figures from the
//! same code.
//!
//! It lives outside `devices` so that the library a worker embeds does not ship mock drivers,
//! TAP/network-namespace helpers and benchmark code; it uses only `devices`' public API.
//!
//! Only the device side is timed for CPU: the driver work (writing descriptors, checking
//! completions) runs on the same thread but outside `CpuMeter::measure`.

// Same rule as `devices`: outside tests, nothing may unwrap or expect.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod blk;
pub mod cpu;
pub mod frames;
pub mod net_mem;
pub mod net_tap;
pub mod netns;
pub mod split_queue;
pub mod vsock;

use std::io;
use std::time::Duration;

pub use cpu::{CpuMeter, CpuTime};
pub use split_queue::{DescSpec, DriverQueue, RingLayout, UsedElem};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("mock guest memory: {0}")]
    Memory(String),
    #[error("virtio queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("setting up {what}: {why}")]
    Setup { what: &'static str, why: String },
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("device misbehaved during the benchmark: {0}")]
    Check(String),
}

impl BenchError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
        let context = context.into();
        move |source| BenchError::Io { context, source }
    }

    pub(crate) fn memory(e: impl std::fmt::Display) -> BenchError {
        BenchError::Memory(e.to_string())
    }
}

/// One measured row: operations (requests or frames) the device completed in `wall` time, the
/// payload bytes they carried, and the device thread's CPU time spent on them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IoFigure {
    pub ops: u64,
    pub bytes: u64,
    pub wall: Duration,
    pub cpu: CpuTime,
    /// Operations the device completed that the far side never saw (net through a TAP only).
    pub lost: u64,
}

impl IoFigure {
    pub fn ops_per_sec(&self) -> f64 {
        per_sec(self.ops as f64, self.wall)
    }

    pub fn mib_per_sec(&self) -> f64 {
        per_sec(self.bytes as f64 / f64::from(1u32 << 20), self.wall)
    }

    /// Device-thread CPU (user + system) per operation, in microseconds.
    pub fn cpu_us_per_op(&self) -> f64 {
        self.per_op_us(self.cpu.total())
    }

    pub fn user_us_per_op(&self) -> f64 {
        self.per_op_us(self.cpu.user)
    }

    pub fn system_us_per_op(&self) -> f64 {
        self.per_op_us(self.cpu.system)
    }

    fn per_op_us(&self, d: Duration) -> f64 {
        if self.ops == 0 {
            return 0.0;
        }
        d.as_secs_f64() * 1e6 / self.ops as f64
    }
}

fn per_sec(amount: f64, wall: Duration) -> f64 {
    let secs = wall.as_secs_f64();
    if secs > 0.0 {
        amount / secs
    } else {
        0.0
    }
}

/// Deterministic xorshift64: reproducible "random" offsets without a dependency.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point.
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figure_rates_and_per_op_cost() {
        let f = IoFigure {
            ops: 1000,
            bytes: 4 << 20,
            wall: Duration::from_secs(2),
            cpu: CpuTime {
                user: Duration::from_millis(1),
                system: Duration::from_millis(3),
            },
            lost: 0,
        };
        assert_eq!(f.ops_per_sec(), 500.0);
        assert_eq!(f.mib_per_sec(), 2.0);
        assert!((f.cpu_us_per_op() - 4.0).abs() < 1e-9);
        assert!((f.user_us_per_op() - 1.0).abs() < 1e-9);
        assert_eq!(IoFigure::default().cpu_us_per_op(), 0.0);
        assert_eq!(IoFigure::default().ops_per_sec(), 0.0);
    }

    #[test]
    fn xorshift_is_deterministic_and_never_stuck() {
        let (mut a, mut b) = (XorShift::new(7), XorShift::new(7));
        assert_eq!(a.next_u64(), b.next_u64());
        let mut z = XorShift::new(0);
        assert_ne!(z.next_u64(), 0);
    }
}
