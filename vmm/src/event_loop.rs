//! The VMM's device thread: one event-manager loop for device queue events, backend readiness
//! (TAP, sockets, stdin) and requests from other threads (through its remote endpoint).
//! Devices never block it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, MutEventSubscriber, RemoteEndpoint, SubscriberOps};

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the event loop: {0}")]
    Create(event_manager::Error),
    #[error("cannot start the event-loop thread: {0}")]
    Spawn(std::io::Error),
    #[error("event loop request failed: {0}")]
    Remote(event_manager::Error),
}

pub struct EventLoop {
    endpoint: RemoteEndpoint<Subscriber>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    pub fn start(subscribers: Vec<Subscriber>) -> Result<Self, EventLoopError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(EventLoopError::Create)?;
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let endpoint = manager.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        tracing::error!("device event loop failed: {e:?}");
                        break;
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(Self {
            endpoint,
            stop,
            thread: Some(thread),
        })
    }

    /// Runs `f` on the event-loop thread and returns its result (devices are only touched there).
    pub fn call<F, O>(&self, f: F) -> Result<O, EventLoopError>
    where
        F: FnOnce(&mut dyn SubscriberOps<Subscriber = Subscriber>) -> O + Send + 'static,
        O: Send + 'static,
    {
        self.endpoint
            .call_blocking(move |ops| Ok::<O, event_manager::Error>(f(ops)))
            .map_err(EventLoopError::Remote)
    }

    pub fn add_subscriber(&self, s: Subscriber) -> Result<(), EventLoopError> {
        self.call(move |ops| {
            ops.add_subscriber(s);
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.endpoint.kick();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("device event loop thread panicked");
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}
