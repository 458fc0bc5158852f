//! Bookkeeping shared by virtio devices for the eventfds they register with the event manager.
//!
//! Activation and reset run on a vCPU thread (through the transport), which has no access to the
//! event loop's `EventOps`. So both only record what should change and write `activate_evt`; the
//! event-loop thread then applies the change in `sync`. Queue eventfds from a past activation are
//! kept open until `sync` removes them from epoll, so their fd numbers cannot be reused (and
//! misrouted) in between.

use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `Events` data of the activation eventfd.
pub const ACTIVATE_TOKEN: u32 = 0;
/// `Events` data of queue `i`'s eventfd is `QUEUE_TOKEN_BASE + i`.
pub const QUEUE_TOKEN_BASE: u32 = 1;
/// First token free for device-specific fds (a TAP, a backend socket).
pub const DEVICE_TOKEN_BASE: u32 = 0x1000;

pub struct DeviceEvents {
    activate_evt: EventFd,
    /// Queue eventfds of the current activation not yet added to epoll.
    pending: Vec<EventFd>,
    /// Queue eventfds of the current activation that are in epoll.
    registered: Vec<EventFd>,
    /// Queue eventfds of past activations still in epoll.
    stale: Vec<EventFd>,
}

impl DeviceEvents {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            pending: Vec::new(),
            registered: Vec::new(),
            stale: Vec::new(),
        })
    }

    /// Registers the activation eventfd; call from `MutEventSubscriber::init`.
    pub fn init(&self, ops: &mut EventOps) {
        let events = Events::with_data(&self.activate_evt, ACTIVATE_TOKEN, EventSet::IN);
        if let Err(e) = ops.add(events) {
            tracing::error!("registering virtio activation eventfd: {e}");
        }
    }

    /// Records the queue eventfds of a new activation and wakes the event loop to register them.
    pub fn activate(&mut self, queue_events: Vec<EventFd>) -> std::io::Result<()> {
        self.retire_current();
        self.pending = queue_events;
        self.activate_evt.write(1)
    }

    /// Records that the current queue eventfds must be unregistered, and wakes the event loop.
    pub fn reset(&mut self) {
        self.retire_current();
        if let Err(e) = self.activate_evt.write(1) {
            tracing::error!("waking event loop after virtio reset: {e}");
        }
    }

    fn retire_current(&mut self) {
        self.stale.append(&mut self.registered);
        // Pending ones never reached epoll: dropping them is enough.
        self.pending.clear();
    }

    /// Applies recorded changes; call from `process` on `ACTIVATE_TOKEN`. Returns true when queue
    /// eventfds were newly registered (the device should then poll its queues once: the driver
    /// may have queued work before the registration).
    pub fn sync(&mut self, ops: &mut EventOps) -> bool {
        // Consume the wake-up; an empty counter (WouldBlock) is fine.
        let _ = self.activate_evt.read();
        for evt in self.stale.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                tracing::warn!("unregistering stale virtio queue eventfd: {e}");
            }
        }
        if self.pending.is_empty() {
            return false;
        }
        for (index, evt) in self.pending.drain(..).enumerate() {
            let token = QUEUE_TOKEN_BASE.saturating_add(u32::try_from(index).unwrap_or(u32::MAX));
            if let Err(e) = ops.add(Events::with_data(&evt, token, EventSet::IN)) {
                tracing::error!("registering virtio queue {index} eventfd: {e}");
            }
            self.registered.push(evt);
        }
        true
    }

    /// Consumes the notification on queue eventfd `fd` and returns its queue index, or None when
    /// `fd` belongs to a past activation (stale events are drained, not acted upon).
    pub fn take_queue_event(&self, fd: RawFd) -> Option<usize> {
        if let Some(index) = self.registered.iter().position(|e| e.as_raw_fd() == fd) {
            let _ = self.registered.get(index).map(EventFd::read);
            return Some(index);
        }
        if let Some(evt) = self.stale.iter().find(|e| e.as_raw_fd() == fd) {
            let _ = evt.read();
        }
        None
    }

    /// True for `Events::data()` tokens that `sync` gave to queue eventfds.
    pub fn is_queue_token(token: u32) -> bool {
        (QUEUE_TOKEN_BASE..DEVICE_TOKEN_BASE).contains(&token)
    }

    #[cfg(test)]
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }
}
