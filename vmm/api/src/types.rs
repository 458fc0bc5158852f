//! The JSON documents the control API exchanges. Field names are the wire format: renaming one
//! breaks clients (see docs/api.md).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Whether the guest's vCPUs are executing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    /// A shutdown was requested and the VM is tearing down.
    ShuttingDown,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting_down",
        })
    }
}

/// One device attached to the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// What the device is, e.g. `"virtio-blk"`, `"virtio-vsock"`, `"serial"`.
    pub kind: String,
    /// A name telling devices of one kind apart (e.g. `"rootfs"`), when the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Guest-physical base of the device's MMIO window, for MMIO devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmio_base: Option<u64>,
    /// The guest interrupt line (GSI), for devices that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irq: Option<u32>,
}

/// `GET /v1/vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// The kind of KVM host the VM runs on, as `dormouse` detected it (e.g. `"kvm-vmx"`, `"kvm-pvm"`).
    pub host: String,
    /// The guest kernel command line the VM booted with.
    pub cmdline: String,
    pub devices: Vec<DeviceInfo>,
    /// Milliseconds since the VM started (or was restored).
    pub uptime_ms: u64,
    /// The guest agent, once it announced itself on vsock port 1023; absent until then (and
    /// again after its announcing connection ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentInfo>,
    /// The balloon device, when the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonInfo>,
}

/// The balloon: `GET /v1/vm` (`balloon`) and the answer of `PUT /v1/vm/balloon`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonInfo {
    /// MiB the guest was asked to give back.
    pub target_mib: u32,
    /// MiB the guest says it gave back (its `actual`, rounded down).
    pub actual_mib: u32,
    pub actual_pages: u32,
    pub deflate_on_oom: bool,
    pub free_page_reporting: bool,
    /// Seconds between statistics requests; 0: no statistics.
    pub stats_interval_s: u16,
    /// The guest's latest statistics by name (`free_memory`, `total_memory`, … in bytes or
    /// counts, as virtio defines them); unknown tags as `tag_N`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub stats: std::collections::BTreeMap<String, u64>,
    /// Age of `stats` in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_age_ms: Option<u64>,
    /// Pages the guest inflated, deflated and reported free since the device was created.
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    pub reported_pages: u64,
    /// Bytes of guest memory given back to the host.
    pub released_bytes: u64,
    /// Guest requests the device refused (out-of-range pages, malformed buffers).
    pub rejected: u64,
}

/// Body of `PUT /v1/vm/balloon`: each field present is changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_mib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_interval_s: Option<u16>,
}

/// The guest agent's announcement: `GET /v1/vm` (`agent`) and `PUT /v1/agent/wait`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The version the agent announced.
    pub version: String,
    /// Milliseconds from the VM's start (or restore) to the announcement.
    pub ready_after_ms: u64,
}

/// Body of `PUT /v1/agent/wait`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentWaitRequest {
    /// How long to wait for the announcement; 0 answers at once.
    #[serde(default)]
    pub timeout_ms: u64,
}

/// Body of `PUT /v1/vsock/connect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConnectRequest {
    /// The guest vsock port to connect to (the agent listens on 1024).
    pub port: u32,
}

/// Body of `PUT /v1/vm/snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Directory to write the snapshot into. Absolute: the VM's working directory is not the
    /// client's.
    pub dir: PathBuf,
    /// Write only the pages dirtied since the previous snapshot (which becomes the parent).
    #[serde(default)]
    pub diff: bool,
    /// Replace a dormouse snapshot already in `dir`. Without it only a missing path or an empty
    /// directory is accepted; a directory holding anything but a snapshot is always refused.
    #[serde(default)]
    pub replace: bool,
    /// Pause the guest only to save its state and write-protect its memory, and write memory
    /// while it runs (a full snapshot of a booted VM's anonymous memory; otherwise the snapshot
    /// is taken paused and `live_unavailable` says why).
    #[serde(default)]
    pub live: bool,
}

/// Response of `PUT /v1/vm/snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub dir: PathBuf,
    pub diff: bool,
    pub snapshot_id: String,
    /// The parent snapshot's id, for diff snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Guest pages stored in this snapshot's memory file.
    pub pages_written: u64,
    /// How the memory file was made: "linked" (the VM's own memory file, `run --mem-dir`, given
    /// a second name: nothing copied) or "written" (the pages were copied).
    #[serde(default)]
    pub memory: String,
    /// How long the snapshot took, pause included.
    pub duration_ms: u64,
    /// How long the guest was paused by this request, in microseconds (0 if it was paused
    /// before).
    #[serde(default)]
    pub paused_us: u64,
    /// Memory was written while the guest ran.
    #[serde(default)]
    pub live: bool,
    /// Why a live snapshot that was asked for was taken paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_unavailable: Option<String>,
}

/// A token bucket, Firecracker's `TokenBucket`: `size` tokens (bytes or operations) refilled
/// from empty in `refill_time` milliseconds, plus `one_time_burst` tokens available once. In a
/// PATCH, a bucket with `size` or `refill_time` 0 switches that limit off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

/// A device's I/O limits, Firecracker's `RateLimiter`. In a PATCH an absent bucket is left as it
/// is; in an answer an absent bucket means no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// Body and answer of `PATCH /v1/vm/drives/{index}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// Body and answer of `PATCH /v1/vm/nets/{index}` (Firecracker's names for the two directions).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetUpdate {
    /// Frames delivered to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Frames the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl From<TokenBucket> for devices::rate_limiter::TokenBucketConfig {
    fn from(b: TokenBucket) -> Self {
        Self {
            size: b.size,
            one_time_burst: b.one_time_burst,
            refill_time: b.refill_time,
        }
    }
}

impl From<devices::rate_limiter::TokenBucketConfig> for TokenBucket {
    fn from(b: devices::rate_limiter::TokenBucketConfig) -> Self {
        Self {
            size: b.size,
            one_time_burst: b.one_time_burst,
            refill_time: b.refill_time,
        }
    }
}

impl From<RateLimiter> for devices::rate_limiter::RateLimiterConfig {
    fn from(r: RateLimiter) -> Self {
        Self {
            bandwidth: r.bandwidth.map(Into::into),
            ops: r.ops.map(Into::into),
        }
    }
}

impl From<devices::rate_limiter::RateLimiterConfig> for RateLimiter {
    fn from(r: devices::rate_limiter::RateLimiterConfig) -> Self {
        Self {
            bandwidth: r.bandwidth.map(Into::into),
            ops: r.ops.map(Into::into),
        }
    }
}

/// Body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
