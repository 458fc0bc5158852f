//! The i8042 keyboard controller, reduced to what a guest uses it for: the CPU reset line.
//! Linux (`reboot=k`) writes 0xfe to port 0x64 to reboot.

use std::sync::Arc;

use crate::bus::BusDevice;

/// Status port offset from the 0x60 base.
const STATUS_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// What the i8042 does when the guest pulls the reset line.
pub trait ResetLine: Send + Sync {
    fn reset_requested(&self);
}

pub struct I8042 {
    reset: Arc<dyn ResetLine>,
}

impl I8042 {
    pub const BASE: u64 = 0x60;
    pub const LEN: u64 = 5;

    pub fn new(reset: Arc<dyn ResetLine>) -> Self {
        Self { reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0x00: output buffer empty, input buffer empty. Answering 0xff makes Linux poll
        // the controller 65,536 times before it resets (seconds under emulation).
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == STATUS_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.reset.reset_requested();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl ResetLine for Count {
        fn reset_requested(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn reset_only_on_0xfe_to_port_0x64() {
        let count = Arc::new(Count::default());
        let mut dev = I8042::new(count.clone());
        let mut b = [0xaa; 1];
        dev.read(4, &mut b);
        assert_eq!(b, [0]);
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xd1]);
        dev.write(4, &[]);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        dev.write(4, &[0xfe]);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }
}
