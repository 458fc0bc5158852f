//! Identities a sandbox must not share with another: its id, vsock CID, TAP names and MACs.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use devices::virtio::vsock::defs::{MAX_GUEST_CID, MIN_GUEST_CID};

/// A sandbox's name within its manager (`sb-<n>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SandboxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for SandboxId {
    fn from(id: &str) -> Self {
        Self(id.to_owned())
    }
}

/// Hands out identities; shared by all tasks of a manager.
pub(crate) struct Identities {
    next_sandbox: AtomicU64,
    next_cid: AtomicU64,
    next_tap: AtomicU64,
    first_cid: u64,
}

impl Identities {
    pub fn new(first_cid: u64) -> Self {
        let first_cid = first_cid.clamp(MIN_GUEST_CID, MAX_GUEST_CID);
        Self {
            next_sandbox: AtomicU64::new(1),
            next_cid: AtomicU64::new(first_cid),
            next_tap: AtomicU64::new(0),
            first_cid,
        }
    }

    pub fn sandbox_id(&self) -> SandboxId {
        SandboxId(format!(
            "sb-{}",
            self.next_sandbox.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// The next guest CID, wrapping inside the valid range. Each VM's userspace vsock device is
    /// private to it, so a CID only has to differ between the sandboxes one worker sees.
    pub fn vsock_cid(&self) -> u64 {
        let span = MAX_GUEST_CID - self.first_cid + 1;
        let n = self.next_cid.fetch_add(1, Ordering::Relaxed) - self.first_cid;
        self.first_cid + n % span
    }

    /// A TAP name unique on this host while this process lives: `dm<pid hex>t<n>`, at most 15
    /// bytes (IFNAMSIZ - 1). Linux pids fit in 22 bits (`PID_MAX_LIMIT`), so 6 hex digits.
    pub fn tap_name(&self) -> String {
        let n = self.next_tap.fetch_add(1, Ordering::Relaxed) % 100_000;
        format!("dm{:x}t{n}", std::process::id() & 0xff_ffff)
    }
}

/// A random locally administered unicast MAC.
pub fn random_mac() -> [u8; 6] {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS per instance: good enough randomness without a crate.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    let v = h.finish().to_le_bytes();
    [(v[0] & 0xfc) | 0x02, v[1], v[2], v[3], v[4], v[5]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cids_taps_are_distinct() {
        let ids = Identities::new(3);
        assert_eq!(ids.sandbox_id().as_str(), "sb-1");
        assert_eq!(ids.sandbox_id().as_str(), "sb-2");
        assert_eq!(ids.vsock_cid(), 3);
        assert_eq!(ids.vsock_cid(), 4);
        let (a, b) = (ids.tap_name(), ids.tap_name());
        assert_ne!(a, b);
        assert!(a.len() <= 15, "{a}");
        assert!(format!("dm{:x}t99999", 0xff_ffff).len() <= 15);
    }

    #[test]
    fn cids_wrap_inside_the_valid_range() {
        let ids = Identities::new(MAX_GUEST_CID);
        assert_eq!(ids.vsock_cid(), MAX_GUEST_CID);
        assert_eq!(ids.vsock_cid(), MAX_GUEST_CID);
        assert_eq!(Identities::new(0).vsock_cid(), MIN_GUEST_CID);
    }

    #[test]
    fn macs_are_local_unicast_and_differ() {
        let (a, b) = (random_mac(), random_mac());
        assert_ne!(a, b);
        for mac in [a, b] {
            assert_eq!(mac[0] & 0x03, 0x02);
        }
    }
}
