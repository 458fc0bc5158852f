//! The AT keyboard behind the i8042's first port: its answers to the commands a driver sends
//! through port 0x60, and the Ctrl+Alt+Del key presses. It has no keys of its own; answering the
//! probe (ID, scancode set, LEDs) at once spares Linux's atkbd its 500 ms timeouts.

/// Acknowledge: the keyboard took the command (or its parameter).
pub const ACK: u8 = 0xfa;
/// Basic assurance test passed (after a reset).
const BAT_OK: u8 = 0xaa;
/// An MF2 keyboard's ID, as `GETID` returns it after the ACK.
const ID: [u8; 2] = [0xab, 0x83];

const CMD_SET_LEDS: u8 = 0xed;
const CMD_ECHO: u8 = 0xee;
const CMD_SCANCODE_SET: u8 = 0xf0;
const CMD_GET_ID: u8 = 0xf2;
const CMD_SET_REPEAT: u8 = 0xf3;
const CMD_RESET: u8 = 0xff;

/// Ctrl, Alt, Del pressed, in scancode set 2 (what the keyboard sends) and set 1 (what the
/// controller hands the guest when it translates): the same bytes Firecracker sends, presses
/// only.
pub const CTRL_ALT_DEL_SET2: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
pub const CTRL_ALT_DEL_SET1: [u8; 4] = [0x1d, 0x38, 0xe0, 0x53];

/// The keyboard's command state: a command that takes a parameter waits for it here.
#[derive(Debug, Default)]
pub struct Keyboard {
    awaiting_param: Option<u8>,
}

impl Keyboard {
    /// The bytes the keyboard sends back for `byte` written to it (at most three).
    pub fn answer(&mut self, byte: u8) -> &'static [u8] {
        if let Some(cmd) = self.awaiting_param.take() {
            // Only "which set" (0) has an answer beyond the ACK: set 2, the one it sends.
            return if cmd == CMD_SCANCODE_SET && byte == 0 {
                &[ACK, 0x02]
            } else {
                &[ACK]
            };
        }
        match byte {
            CMD_SET_LEDS | CMD_SCANCODE_SET | CMD_SET_REPEAT => {
                self.awaiting_param = Some(byte);
                &[ACK]
            }
            CMD_GET_ID => &[ACK, ID[0], ID[1]],
            CMD_ECHO => &[CMD_ECHO],
            CMD_RESET => &[ACK, BAT_OK],
            // Enable, disable, defaults, typematic modes, resend: taken, nothing to change.
            _ => &[ACK],
        }
    }

    /// A command written to the controller (not to the keyboard) ends any parameter wait.
    pub fn cancel(&mut self) {
        self.awaiting_param = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_the_atkbd_probe() {
        let mut kbd = Keyboard::default();
        assert_eq!(kbd.answer(CMD_GET_ID), &[ACK, 0xab, 0x83]);
        assert_eq!(kbd.answer(CMD_SET_LEDS), &[ACK]);
        assert_eq!(kbd.answer(0x00), &[ACK]);
        assert_eq!(kbd.answer(CMD_SCANCODE_SET), &[ACK]);
        assert_eq!(kbd.answer(0x00), &[ACK, 0x02]);
        // A parameter is taken once: the next 0xf2 is a command again.
        assert_eq!(kbd.answer(CMD_GET_ID), &[ACK, 0xab, 0x83]);
        assert_eq!(kbd.answer(CMD_ECHO), &[CMD_ECHO]);
        assert_eq!(kbd.answer(CMD_RESET), &[ACK, BAT_OK]);
        assert_eq!(kbd.answer(0xf4), &[ACK]);
    }

    #[test]
    fn cancel_drops_a_pending_parameter() {
        let mut kbd = Keyboard::default();
        kbd.answer(CMD_SCANCODE_SET);
        kbd.cancel();
        assert_eq!(kbd.answer(CMD_GET_ID), &[ACK, 0xab, 0x83]);
    }
}
