//! Protocol constants of virtio-vsock (virtio spec 1.2, section 5.10) and this device's limits.

/// The host's CID: every packet the guest sends must be addressed to it.
pub const HOST_CID: u64 = 2;
/// CIDs 0..=2 are reserved and u32::MAX is VMADDR_CID_ANY; Linux keeps CIDs in 32 bits.
pub const MIN_GUEST_CID: u64 = 3;
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Queue indices.
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
pub const EVQ: usize = 2;
pub const NUM_QUEUES: usize = 3;
pub const QUEUE_SIZE: u16 = 256;

/// virtio device ID of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;

/// Stream sockets are the only type offered (no SEQPACKET feature).
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Event queue: `struct virtio_vsock_event { le32 id; }`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
pub const EVENT_SIZE: usize = 4;

/// Largest payload accepted in one TX packet or produced in one RX packet. Linux never sends
/// more than 64 KiB per packet.
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// Per-connection buffer for guest data the host socket has not accepted yet. This is also the
/// `buf_alloc` advertised to the guest, so an honest guest can never overrun it.
pub const CONN_TX_BUF_SIZE: u32 = 256 * 1024;
/// Send a CREDIT_UPDATE once the guest believes it has less than this much room left.
pub const CONN_CREDIT_LOW_WATER: u32 = CONN_TX_BUF_SIZE / 4;

/// Upper bound on live connections, so a guest cannot exhaust host fds or memory.
pub const MAX_CONNECTIONS: usize = 1024;
/// Upper bound on queued RST replies for packets without a connection; extras are dropped.
pub const MAX_PENDING_RST: usize = 256;

/// How long a host-initiated connection waits for the guest to answer its REQUEST.
pub const CONN_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Host-initiated connections get local ports from this range, away from well-known ports.
pub const LOCAL_PORT_BASE: u32 = 1 << 30;
