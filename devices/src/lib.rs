//! Device models for dormouse: legacy PIO devices (serial, i8042) and virtio devices behind the
//! virtio-mmio transport. Nothing here issues KVM ioctls: devices are handed guest memory, an
//! interrupt trigger and eventfds by the VMM, so each one is testable without a VM.

// Guest memory, snapshot files and API requests are hostile input: outside tests, nothing may
// unwrap or expect (a panic would end the VM). Tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod bus;
pub mod interrupt;
pub mod legacy;
pub mod mmds;
pub mod persist;
pub mod rate_limiter;
pub mod virtio;

/// Guest memory as every device sees it. The bitmap records writes the VMM makes on the guest's
/// behalf (virtio used rings, blk reads, net RX), which KVM's dirty log cannot see; diff snapshots
/// merge both.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
