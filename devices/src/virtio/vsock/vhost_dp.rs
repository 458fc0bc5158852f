//! vhost-kernel datapath: `/dev/vhost-vsock` moves the RX/TX rings itself. The VMM hands it the
//! memory table, the two data vrings (addresses, size, avail index), the transport's queue
//! eventfds as kick fds, and call eventfds it watches to raise the virtio interrupt. The event
//! queue stays with the VMM (transport-reset events after snapshot restore).

use std::sync::Arc;

use vhost::vhost_kern::vsock::Vsock as KernVsock;
use vhost::vsock::VhostVsock;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::defs::{RXQ, TXQ};
use crate::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("vhost-vsock {step}: {source}")]
    Vhost {
        step: &'static str,
        source: vhost::Error,
    },
    #[error("vhost-vsock call eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("vhost-vsock needs queues {RXQ} and {TXQ}")]
    MissingQueue,
}

pub struct VhostDatapath {
    kern: KernVsock<Arc<GuestMemory>>,
    /// Per data queue (RX, TX): the kernel signals these when it used buffers.
    calls: Vec<EventFd>,
}

fn step<T>(step: &'static str, r: vhost::Result<T>) -> Result<T, VhostError> {
    r.map_err(|source| VhostError::Vhost { step, source })
}

impl VhostDatapath {
    pub fn start(
        guest_cid: u64,
        mem: &GuestMemory,
        queues: &[Queue],
        queue_events: &[EventFd],
        acked_features: u64,
    ) -> Result<Self, VhostError> {
        let kern = step("open", KernVsock::new(Arc::new(mem.clone())))?;
        step("set_owner", kern.set_owner())?;
        let offered = step("get_features", kern.get_features())?;
        step("set_features", kern.set_features(offered & acked_features))?;

        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().raw_value(),
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            })
            .collect();
        step("set_mem_table", kern.set_mem_table(&regions))?;

        let mut calls = Vec::with_capacity(2);
        for index in [RXQ, TXQ] {
            let q = queues.get(index).ok_or(VhostError::MissingQueue)?;
            let kick = queue_events.get(index).ok_or(VhostError::MissingQueue)?;
            let call = EventFd::new(EFD_NONBLOCK).map_err(VhostError::EventFd)?;
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: q.desc_table(),
                used_ring_addr: q.used_ring(),
                avail_ring_addr: q.avail_ring(),
                log_addr: None,
            };
            step("set_vring_num", kern.set_vring_num(index, q.size()))?;
            step("set_vring_addr", kern.set_vring_addr(index, &config))?;
            step("set_vring_base", kern.set_vring_base(index, q.next_avail()))?;
            step("set_vring_call", kern.set_vring_call(index, &call))?;
            step("set_vring_kick", kern.set_vring_kick(index, kick))?;
            calls.push(call);
        }
        step("set_guest_cid", kern.set_guest_cid(guest_cid))?;
        step("start", kern.start())?;
        tracing::info!(guest_cid, "vsock: vhost-kernel datapath started");
        Ok(Self { kern, calls })
    }

    pub fn call_events(&self) -> &[EventFd] {
        &self.calls
    }

    /// Stops the kernel worker; closing the fd (on drop) releases every kernel connection.
    pub fn stop(self) {
        if let Err(e) = self.kern.stop() {
            tracing::warn!("vsock: stopping vhost-vsock: {e}");
        }
    }
}
