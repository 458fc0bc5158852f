//! The VMM's device thread: one event-manager loop for device queue events, backend readiness
//! (TAP, sockets, stdin) and requests from other threads (through its remote endpoint).
//! Devices never block it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, MutEventSubscriber, RemoteEndpoint, SubscriberOps};

use crate::hypervisor::vcpu::{ExitSink, VmExit};
use crate::seccomp::{SeccompLevel, ThreadKind};

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
    /// Present while the loop is parked: sending on it lets the loop go on.
    resume: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl EventLoop {
    /// Starts the device thread. A panic in a device, or a failing event loop, ends the VM that
    /// `exit` belongs to: a VM without its devices must not run on.
    pub fn start(
        subscribers: Vec<Subscriber>,
        exit: Arc<ExitSink>,
        seccomp: SeccompLevel,
    ) -> Result<Self, EventLoopError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(EventLoopError::Create)?;
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let endpoint = manager.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = crate::thread_guard::spawn("devices".into(), exit.clone(), move || {
            // Before the first event: no device runs unfiltered.
            if let Err(e) = crate::seccomp::install(ThreadKind::Devices, seccomp) {
                exit.report(VmExit::Failed(format!("device thread: {e}")));
                return;
            }
            while !stop_flag.load(Ordering::Acquire) {
                if let Err(e) = manager.run() {
                    exit.report(VmExit::Failed(format!("device event loop failed: {e:?}")));
                    break;
                }
            }
        })
        .map_err(EventLoopError::Spawn)?;
        Ok(Self {
            endpoint,
            stop,
            thread: Some(thread),
            resume: Mutex::new(None),
        })
    }

    /// Parks the loop thread between events: no device runs until `unpark`. Devices finish each
    /// request inside one event, so when this returns none has work in flight.
    pub fn park(&self) -> Result<(), EventLoopError> {
        let mut resume = self.resume.lock().unwrap_or_else(|e| e.into_inner());
        if resume.is_some() {
            return Ok(());
        }
        let (parked_tx, parked_rx) = std::sync::mpsc::channel::<()>();
        let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
        self.endpoint
            .fire(move |_| {
                let _ = parked_tx.send(());
                // Unparked by `unpark`, or by the sender being dropped (stop).
                let _ = resume_rx.recv();
            })
            .map_err(EventLoopError::Remote)?;
        parked_rx
            .recv()
            .map_err(|_| EventLoopError::Remote(event_manager::Error::ChannelRecv))?;
        *resume = Some(resume_tx);
        Ok(())
    }

    pub fn unpark(&self) {
        let mut resume = self.resume.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = resume.take() {
            let _ = tx.send(());
        }
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

    /// Runs `f` on the event-loop thread without waiting for it.
    pub fn fire(&self, f: impl FnOnce() + Send + 'static) -> Result<(), EventLoopError> {
        self.endpoint
            .fire(move |_| f())
            .map_err(EventLoopError::Remote)
    }

    pub fn add_subscriber(&self, s: Subscriber) -> Result<(), EventLoopError> {
        self.call(move |ops| {
            ops.add_subscriber(s);
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.unpark();
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

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventOps, Events, MutEventSubscriber};
    use std::sync::atomic::AtomicUsize;
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::eventfd::EventFd;

    struct Counter {
        evt: EventFd,
        count: Arc<AtomicUsize>,
    }
    impl MutEventSubscriber for Counter {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            let _ = self.evt.read();
            self.count.fetch_add(1, Ordering::SeqCst);
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn parked_loop_processes_nothing_until_unparked() {
        let evt = EventFd::new(0).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let sub: Subscriber = Arc::new(Mutex::new(Counter {
            evt: evt.try_clone().unwrap(),
            count: count.clone(),
        }));
        let mut el =
            EventLoop::start(vec![sub], Arc::new(ExitSink::default()), SeccompLevel::Off).unwrap();
        evt.write(1).unwrap();
        let wait_for = |n: usize| {
            for _ in 0..200 {
                if count.load(Ordering::SeqCst) >= n {
                    return true;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            false
        };
        assert!(wait_for(1));
        el.park().unwrap();
        el.park().unwrap(); // idempotent
        evt.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "no processing while parked"
        );
        el.unpark();
        assert!(wait_for(2));
        el.park().unwrap();
        el.stop(); // stopping a parked loop must not hang
    }

    struct Panicker {
        evt: EventFd,
    }
    impl MutEventSubscriber for Panicker {
        fn process(&mut self, _: Events, _: &mut EventOps) {
            panic!("device model bug");
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn a_panicking_device_ends_the_vm_and_the_loop_still_stops() {
        let evt = EventFd::new(0).unwrap();
        let sub: Subscriber = Arc::new(Mutex::new(Panicker {
            evt: evt.try_clone().unwrap(),
        }));
        let exit = Arc::new(ExitSink::default());
        let mut el = EventLoop::start(vec![sub], exit.clone(), SeccompLevel::Off).unwrap();
        evt.write(1).unwrap();
        assert_eq!(
            exit.wait(),
            VmExit::Failed("devices thread panicked: device model bug".into())
        );
        // Parking or calling into a dead loop is an error, not a hang.
        assert!(el.park().is_err());
        assert!(el.call(|_| ()).is_err());
        el.stop();
    }
}
