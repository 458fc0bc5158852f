//! Drains the request queue: every available chain is executed and returned, and the driver is
//! interrupted at most once per call (subject to EVENT_IDX / NO_INTERRUPT suppression). A broken
//! ring (`queue_check::pop_checked`) ends the run with an error; chains before it were completed.

use virtio_queue::{Queue, QueueT};

use super::request::{process_request, Disk};
use crate::virtio::queue_check::pop_checked;
use crate::GuestMemory;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRun {
    /// Chains returned to the driver.
    pub completed: u32,
    /// Whether the driver asked to be interrupted for them.
    pub notify: bool,
}

pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemory,
    disk: &Disk,
) -> Result<QueueRun, virtio_queue::Error> {
    let mut completed = 0u32;
    loop {
        queue.disable_notification(mem)?;
        let mut progressed = false;
        while let Some(chain) = pop_checked(queue, mem)? {
            progressed = true;
            let head = chain.head_index();
            let done = process_request(mem, chain, disk);
            if let Err(e) = queue.add_used(mem, head, done.used_len) {
                // Only a bogus head index gets here; the driver cannot be told.
                tracing::debug!("virtio-blk: returning chain {head}: {e}");
                continue;
            }
            completed = completed.saturating_add(1);
        }
        // Re-enabling reports chains added meanwhile. Without progress, the available ring is
        // unreadable: stop rather than spin.
        if !queue.enable_notification(mem)? || !progressed {
            break;
        }
    }
    let notify = completed > 0 && queue.needs_notification(mem)?;
    Ok(QueueRun { completed, notify })
}
