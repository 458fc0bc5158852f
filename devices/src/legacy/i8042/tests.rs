use super::*;
use crate::interrupt::CountingLine;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Default)]
struct Count(AtomicUsize);
impl ResetLine for Count {
    fn reset_requested(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Rig {
    dev: I8042,
    resets: Arc<Count>,
    irqs: Arc<CountingLine>,
}

impl Rig {
    fn new() -> Self {
        let resets = Arc::new(Count::default());
        let irqs = Arc::new(CountingLine::default());
        Self {
            dev: I8042::new(resets.clone(), irqs.clone()),
            resets,
            irqs,
        }
    }

    fn status(&mut self) -> u8 {
        let mut b = [0xaa];
        self.dev.read(STATUS_OFFSET, &mut b);
        b[0]
    }

    fn read_data(&mut self) -> u8 {
        let mut b = [0xaa];
        self.dev.read(DATA_OFFSET, &mut b);
        b[0]
    }

    /// Reads while the status says a byte is there, as Linux's driver does.
    fn drain(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while self.status() & STR_OBF != 0 && out.len() <= BUF_SIZE {
            out.push(self.read_data());
        }
        out
    }

    fn command(&mut self, cmd: u8) -> Vec<u8> {
        self.dev.write(STATUS_OFFSET, &[cmd]);
        self.drain()
    }

    fn irqs(&self) -> usize {
        self.irqs.0.load(Ordering::SeqCst)
    }

    fn resets(&self) -> usize {
        self.resets.0.load(Ordering::SeqCst)
    }
}

#[test]
fn answers_the_linux_probe_sequence() {
    let mut rig = Rig::new();
    // Empty and unlocked at first: nothing to flush.
    assert_eq!(rig.status() & STR_OBF, 0);
    assert_ne!(rig.status() & STR_KEYLOCK, 0);
    assert_eq!(rig.command(CMD_SELF_TEST), vec![SELF_TEST_OK]);
    assert_eq!(rig.command(CMD_KBD_TEST), vec![KBD_TEST_OK]);
    let ctr = rig.command(CMD_READ_CTR);
    assert_eq!(ctr, vec![CTR_KBDINT | CTR_SYS | CTR_AUXDIS]);
    // Write the control byte: the parameter goes to port 0x60 while STR_CMD is up.
    rig.dev.write(STATUS_OFFSET, &[CMD_WRITE_CTR]);
    assert_ne!(rig.status() & STR_CMD, 0);
    rig.dev
        .write(DATA_OFFSET, &[CTR_SYS | CTR_KBDDIS | CTR_AUXDIS]);
    assert_eq!(rig.status() & STR_CMD, 0);
    assert_eq!(
        rig.command(CMD_READ_CTR),
        vec![CTR_SYS | CTR_KBDDIS | CTR_AUXDIS]
    );
    // Disable and enable the keyboard port: the control byte follows.
    rig.command(CMD_KBD_ENABLE);
    assert_eq!(rig.command(CMD_READ_CTR), vec![CTR_SYS | CTR_AUXDIS]);
    rig.command(CMD_KBD_DISABLE);
    assert_eq!(
        rig.command(CMD_READ_CTR),
        vec![CTR_SYS | CTR_KBDDIS | CTR_AUXDIS]
    );
    // The AUX loop test answers at once on the keyboard side, the AUX test says "absent".
    rig.dev.write(STATUS_OFFSET, &[CMD_WRITE_AUX_OUTBUF]);
    rig.dev.write(DATA_OFFSET, &[0x5a]);
    assert_eq!(rig.drain(), vec![0x5a]);
    assert_eq!(rig.command(CMD_AUX_TEST), vec![AUX_TEST_ABSENT]);
    // Controller answers never interrupt (Linux polls for them with the interrupt off).
    assert_eq!(rig.irqs(), 0);
    assert_eq!(rig.resets(), 0);
}

#[test]
fn keyboard_commands_are_answered_with_an_interrupt() {
    let mut rig = Rig::new();
    rig.dev.write(DATA_OFFSET, &[0xf2]);
    assert_eq!(rig.irqs(), 1);
    // Each byte read with more behind it raises one more edge.
    assert_eq!(rig.drain(), vec![keyboard::ACK, 0xab, 0x83]);
    assert_eq!(rig.irqs(), 3);
    // With the keyboard interrupt off, the answer is there but nothing interrupts.
    rig.dev.write(STATUS_OFFSET, &[CMD_WRITE_CTR]);
    rig.dev.write(DATA_OFFSET, &[CTR_SYS]);
    rig.dev.write(DATA_OFFSET, &[0xf4]);
    assert_eq!(rig.drain(), vec![keyboard::ACK]);
    assert_eq!(rig.irqs(), 3);
}

#[test]
fn ctrl_alt_del_bytes_in_order_with_irq_1() {
    let mut rig = Rig::new();
    rig.dev.send_ctrl_alt_del().unwrap();
    assert_eq!(rig.irqs(), 1);
    assert_eq!(rig.drain(), vec![0x14, 0x11, 0xe0, 0x71]);
    assert_eq!(rig.irqs(), 4);
    assert_eq!(rig.read_data(), 0, "an empty buffer reads 0");
}

#[test]
fn ctrl_alt_del_in_set_1_when_the_controller_translates() {
    let mut rig = Rig::new();
    rig.dev.write(STATUS_OFFSET, &[CMD_WRITE_CTR]);
    rig.dev
        .write(DATA_OFFSET, &[CTR_KBDINT | CTR_SYS | CTR_XLATE]);
    rig.dev.send_ctrl_alt_del().unwrap();
    assert_eq!(rig.drain(), vec![0x1d, 0x38, 0xe0, 0x53]);
}

#[test]
fn buffer_is_bounded_and_ctrl_alt_del_all_or_nothing() {
    let mut rig = Rig::new();
    for _ in 0..BUF_SIZE / 4 {
        rig.dev.send_ctrl_alt_del().unwrap();
    }
    assert_eq!(rig.dev.send_ctrl_alt_del(), Err(I8042Error::BufferFull));
    // Drain 3 bytes: still no room for 4.
    for _ in 0..3 {
        rig.read_data();
    }
    assert_eq!(rig.dev.send_ctrl_alt_del(), Err(I8042Error::BufferFull));
    rig.read_data();
    rig.dev.send_ctrl_alt_del().unwrap();
    assert_eq!(rig.drain().len(), BUF_SIZE);
}

#[test]
fn hostile_writes_do_not_panic_or_grow_the_buffer() {
    let mut rig = Rig::new();
    for a in 0..=255u8 {
        for b in [0u8, 0x20, 0x60, 0xd1, 0xd2, 0xd3, 0xf0, 0xff] {
            if a == CMD_RESET_CPU {
                continue;
            }
            rig.dev.write(STATUS_OFFSET, &[a]);
            rig.dev.write(DATA_OFFSET, &[b]);
            rig.dev.write(DATA_OFFSET, &[a]);
            rig.dev.write(2, &[a]);
            rig.dev.write(DATA_OFFSET, &[a, b]);
            rig.dev.write(STATUS_OFFSET, &[]);
            let mut wide = [0u8; 4];
            rig.dev.read(DATA_OFFSET, &mut wide);
            assert_eq!(wide, [0; 4]);
            assert!(rig.dev.buf.len() <= BUF_SIZE);
        }
    }
    assert_eq!(rig.resets(), 0);
}

#[test]
fn reset_only_on_0xfe_to_port_0x64() {
    let mut rig = Rig::new();
    rig.dev.write(DATA_OFFSET, &[0xfe]);
    rig.dev.write(STATUS_OFFSET, &[0xd1]);
    rig.dev.write(STATUS_OFFSET, &[]);
    assert_eq!(rig.resets(), 0);
    // Even with a command waiting for its parameter, 0xfe on 0x64 is a new command.
    rig.dev.write(STATUS_OFFSET, &[CMD_RESET_CPU]);
    assert_eq!(rig.resets(), 1);
}
