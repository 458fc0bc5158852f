//! The counter handles each part of a VM increments, and the names each counter has in the
//! JSON (Firecracker's field names where Firecracker has the counter) and in Prometheus.

use prometheus::{Counter, IntCounter};

/// One counter's names.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    /// Field name in the JSON group (Firecracker's where one exists).
    pub json: &'static str,
    /// Prometheus name without the `dormouse_` prefix (ends in `_total`).
    pub prom: &'static str,
    /// Value of the `kind` label, for counters that share one Prometheus name.
    pub kind: Option<&'static str>,
    pub help: &'static str,
}

/// Declares a handle struct of integer counters with their `Field`s, in declaration order.
macro_rules! counter_set {
    ($(#[$meta:meta])* $name:ident {
        $($(#[$fmeta:meta])* $field:ident => $prom:literal $(kind $kind:literal)?, $help:literal;)*
    }) => {
        $(#[$meta])*
        #[derive(Clone, Debug)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: IntCounter,)*
        }

        impl $name {
            pub const FIELDS: &'static [Field] = &[$(Field {
                json: stringify!($field),
                prom: $prom,
                kind: counter_set!(@kind $($kind)?),
                help: $help,
            },)*];

            /// Builds the handle from counters in `FIELDS` order.
            pub(crate) fn from_counters(counters: Vec<IntCounter>) -> Option<Self> {
                let mut it = counters.into_iter();
                Some(Self { $($field: it.next()?,)* })
            }

            /// The counters in `FIELDS` order (the VM-wide sets' JSON groups use it).
            #[allow(dead_code)]
            pub(crate) fn counters(&self) -> Vec<IntCounter> {
                vec![$(self.$field.clone(),)*]
            }
        }
    };
    (@kind $kind:literal) => { Some($kind) };
    (@kind) => { None };
}

counter_set! {
    /// One virtio-blk device (JSON group `block_<id>`, Prometheus label `device`).
    BlockMetrics {
        read_count => "block_read_requests_total", "Completed read (IN) requests.";
        write_count => "block_write_requests_total", "Completed write (OUT) requests.";
        read_bytes => "block_read_bytes_total", "Bytes read from the disk into guest memory.";
        write_bytes => "block_write_bytes_total", "Bytes written to the disk from guest memory.";
        flush_count => "block_flushes_total", "Completed flush requests.";
        /// Requests the device could not parse or does not support (status IOERR or UNSUPP
        /// before any I/O).
        invalid_reqs_count => "block_invalid_requests_total", "Malformed or unsupported requests.";
        /// Requests whose file I/O failed.
        execute_fails => "block_errors_total", "Requests whose I/O failed.";
        rate_limiter_throttled_events => "block_rate_limiter_throttled_total",
            "Times the rate limiter stopped the queue.";
    }
}

counter_set! {
    /// One virtio-net device (JSON group `net_<id>`, Prometheus label `device`).
    NetMetrics {
        rx_packets_count => "net_rx_packets_total", "Frames delivered to the guest.";
        rx_bytes_count => "net_rx_bytes_total", "Bytes delivered to the guest (virtio-net header included).";
        tx_packets_count => "net_tx_packets_total", "Frames the guest sent to the TAP.";
        tx_bytes_count => "net_tx_bytes_total", "Bytes the guest sent to the TAP (virtio-net header included).";
        /// Frames read from the TAP but larger than the guest's buffers.
        rx_dropped => "net_rx_dropped_total", "Frames dropped on the way to the guest.";
        /// Malformed TX chains (tx_malformed_frames in Firecracker) and frames the TAP refused.
        tx_dropped => "net_tx_dropped_total", "Frames from the guest dropped.";
        tap_read_fails => "net_tap_read_errors_total", "Failed TAP reads.";
        tap_write_fails => "net_tap_write_errors_total", "Failed TAP writes.";
        rx_rate_limiter_throttled => "net_rx_rate_limiter_throttled_total",
            "Times the RX rate limiter stopped delivery.";
        tx_rate_limiter_throttled => "net_tx_rate_limiter_throttled_total",
            "Times the TX rate limiter stopped the queue.";
    }
}

counter_set! {
    /// The vsock device, userspace datapath (JSON group `vsock`, Prometheus label `device`
    /// `vsock`). The vhost-kernel datapath moves packets in the kernel: not counted.
    VsockMetrics {
        conns_added => "vsock_connections_added_total", "Connections opened (either side).";
        conns_removed => "vsock_connections_removed_total", "Connections closed.";
        /// Guest connects nobody listens for, and connects over the connection limit.
        conns_refused => "vsock_connections_refused_total", "Connection requests refused.";
        rx_packets_count => "vsock_rx_packets_total", "Packets delivered to the guest.";
        rx_bytes_count => "vsock_rx_bytes_total", "Payload bytes delivered to the guest.";
        tx_packets_count => "vsock_tx_packets_total", "Packets the guest sent.";
        tx_bytes_count => "vsock_tx_bytes_total", "Payload bytes the guest sent.";
        /// Packets lost: malformed TX chains, RX buffers that could not be written, RSTs
        /// over the queue's bound.
        packets_dropped => "vsock_packets_dropped_total", "Packets dropped.";
    }
}

counter_set! {
    /// vCPU exits of the whole VM (JSON group `vcpu`, Prometheus label `kind`).
    VcpuMetrics {
        exit_io_in => "vcpu_exits_total" kind "io_in", "vCPU exits by kind.";
        exit_io_out => "vcpu_exits_total" kind "io_out", "vCPU exits by kind.";
        exit_mmio_read => "vcpu_exits_total" kind "mmio_read", "vCPU exits by kind.";
        exit_mmio_write => "vcpu_exits_total" kind "mmio_write", "vCPU exits by kind.";
        exit_hlt => "vcpu_exits_total" kind "hlt", "vCPU exits by kind.";
        exit_shutdown => "vcpu_exits_total" kind "shutdown", "vCPU exits by kind.";
        /// Failed entries, internal errors, unexpected exits, failed KVM_RUN.
        failures => "vcpu_exits_total" kind "fail", "vCPU exits by kind.";
    }
}

counter_set! {
    /// The VM's MMDS responders, all interfaces together (JSON group `mmds`, Firecracker's).
    /// Firecracker's `rx_accepted_unusual`, `rx_bad_eth`, `rx_count` and `tx_count` are left
    /// out: see docs/metrics.md.
    MmdsMetrics {
        rx_accepted => "mmds_rx_frames_total", "Guest frames taken by the MMDS.";
        /// Only frames too large to be one Ethernet frame (GSO): smoltcp drops malformed
        /// frames without telling.
        rx_accepted_err => "mmds_rx_dropped_total", "Guest frames the MMDS dropped unread (too large).";
        /// GETs without a token header (V2 answers 401; V1 serves them, as Firecracker).
        rx_no_token => "mmds_rx_no_token_total", "GET requests with no session token.";
        /// GETs whose token is unknown or expired (V2 answers 401; V1 serves them).
        rx_invalid_token => "mmds_rx_invalid_token_total", "GET requests with an invalid session token.";
        requests_count => "mmds_requests_total", "HTTP requests answered (any status).";
        tx_frames => "mmds_tx_frames_total", "Frames the MMDS sent to the guest.";
        tx_bytes => "mmds_tx_bytes_total", "Bytes of those frames (Ethernet header included).";
        /// Replies lost because the guest left 64 frames unread.
        tx_errors => "mmds_tx_dropped_total", "Frames for the guest dropped (queue full).";
        connections_created => "mmds_connections_created_total", "TCP connections opened by the guest.";
        /// Closed, reset, or aborted after the answer.
        connections_destroyed => "mmds_connections_destroyed_total", "TCP connections ended.";
    }
}

counter_set! {
    /// Requests on the VM's control socket, both APIs (JSON group `api_server`).
    ApiMetrics {
        requests_count => "api_requests_total", "Control API requests answered.";
        requests_fails => "api_request_errors_total", "Control API requests answered with an error status.";
    }
}

/// Snapshots of the VM: counts and time spent, by kind (JSON groups `snapshot` and
/// `latencies_us`).
#[derive(Clone, Debug)]
pub struct SnapshotMetrics {
    pub(crate) full_creates: IntCounter,
    pub(crate) diff_creates: IntCounter,
    pub(crate) loads: IntCounter,
    pub(crate) full_create_seconds: Counter,
    pub(crate) diff_create_seconds: Counter,
    pub(crate) load_seconds: Counter,
}

impl SnapshotMetrics {
    /// A snapshot was written (full or diff) in `took`.
    pub fn record_create(&self, diff: bool, took: std::time::Duration) {
        let (count, seconds) = if diff {
            (&self.diff_creates, &self.diff_create_seconds)
        } else {
            (&self.full_creates, &self.full_create_seconds)
        };
        count.inc();
        seconds.inc_by(took.as_secs_f64());
    }

    /// The VM was restored from a snapshot in `took`.
    pub fn record_load(&self, took: std::time::Duration) {
        self.loads.inc();
        self.load_seconds.inc_by(took.as_secs_f64());
    }
}
