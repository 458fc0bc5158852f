//! Firecracker's MicroVM Metadata Service (MMDS): a JSON document the host sets through the API
//! and the guest reads over HTTP at a link-local address, answered inside the virtio-net device
//! (the frames never reach the TAP).
//!
//! `store` (the document, its formats and size limit), `token` (V2 session tokens), `http` (one
//! guest request to one response, pure), `intercept` (which guest frames are the MMDS's),
//! `stack` (the responder: ARP, IPv4, TCP from `smoltcp`, bounded queues).

pub mod http;
pub mod intercept;
pub mod stack;
pub mod store;
pub mod token;

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

pub use stack::Responder;
pub use store::{DataStore, MmdsVersion, OutputFormat, StoreError, DEFAULT_SIZE_LIMIT};
pub use token::{TokenError, TokenTable};

/// Firecracker's default MMDS address.
pub const DEFAULT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// One VM's MMDS: the document and the tokens it issued, shared by the API and every network
/// device that serves it.
#[derive(Debug, Default)]
pub struct Mmds {
    pub store: DataStore,
    pub tokens: TokenTable,
}

#[derive(Clone, Debug, Default)]
pub struct SharedMmds(Arc<Mutex<Mmds>>);

impl SharedMmds {
    pub fn new(mmds: Mmds) -> Self {
        Self(Arc::new(Mutex::new(mmds)))
    }

    /// The MMDS holds plain data: a panic while it was locked left nothing half-updated that
    /// matters more than serving the guest, so a poisoned lock is taken as it is.
    pub fn lock(&self) -> MutexGuard<'_, Mmds> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The same service, not equal contents.
impl PartialEq for SharedMmds {
    fn eq(&self, other: &Self) -> bool {
        self.same(other)
    }
}

impl Eq for SharedMmds {}

/// What a snapshot keeps of an interface's MMDS, as Firecracker: how it is reached and spoken
/// to, not the document (a clone gets its own data from its host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmdsNetState {
    pub ipv4: Ipv4Addr,
    pub version: MmdsVersion,
    pub imds_compat: bool,
}

/// A network device's link to the MMDS: the address it answers at, and the service.
#[derive(Clone, Debug)]
pub struct MmdsNetConfig {
    pub ipv4: Ipv4Addr,
    pub mmds: SharedMmds,
}

impl PartialEq for MmdsNetConfig {
    fn eq(&self, other: &Self) -> bool {
        self.ipv4 == other.ipv4 && self.mmds == other.mmds
    }
}

impl Eq for MmdsNetConfig {}

impl MmdsNetConfig {
    /// The link a restored interface gets from its saved state: `mmds` (the VM's service, or a
    /// new empty one) set to the saved version.
    pub fn restore(state: &MmdsNetState, mmds: Option<SharedMmds>) -> Self {
        let mmds = mmds.unwrap_or_default();
        mmds.lock()
            .store
            .set_version(state.version, state.imds_compat);
        Self {
            ipv4: state.ipv4,
            mmds,
        }
    }
}

/// Now, for token expiry (a function so tests and the stack agree on the clock).
pub fn now() -> Instant {
    Instant::now()
}

#[cfg(test)]
mod tests;
