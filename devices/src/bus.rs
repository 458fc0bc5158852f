//! Address buses (PIO and MMIO): map an exit's address to the device that owns it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable from a vCPU exit. `offset` is relative to the device's base address.
/// Implementations must tolerate any offset and any access size: both are guest-controlled.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Ordered, non-overlapping ranges. Lookups are O(log n) and lock only the target device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_prev = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, &entry.device))
    }

    /// Returns false when no device owns `addr`, or when its owner panicked earlier (the caller
    /// decides what an unowned access does). A device whose lock is poisoned may be half-updated:
    /// it is never touched again, and the panic has already ended the VM.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => match dev.lock() {
                Ok(mut dev) => {
                    dev.read(offset, data);
                    true
                }
                Err(_) => false,
            },
            None => false,
        }
    }

    /// Like [`Bus::read`]; a write to an unowned or broken device is dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => match dev.lock() {
                Ok(mut dev) => {
                    dev.write(offset, data);
                    true
                }
                Err(_) => false,
            },
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xf8, 0x10),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert!(bus.insert(dev.clone(), 0x110, 1).is_ok());
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        let mut buf = [0u8; 2];
        assert!(bus.read(0x103, &mut buf));
        assert_eq!(buf, [3, 3]);
        assert!(!bus.read(0x111, &mut buf));
        assert!(bus.write(0x10f, &[9]));
        assert_eq!(dev.lock().unwrap().0, vec![(0xf, vec![9])]);
    }

    #[test]
    fn a_device_that_panicked_is_never_touched_again() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(dev.clone(), 0x10, 0x10).unwrap();
        let poisoner = dev.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("device bug");
        })
        .join();
        assert!(dev.is_poisoned());
        assert!(!bus.write(0x11, &[1]));
        let mut data = [0u8; 1];
        assert!(!bus.read(0x11, &mut data));
        assert!(dev.lock().unwrap_or_else(|e| e.into_inner()).0.is_empty());
    }
}
