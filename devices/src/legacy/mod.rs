//! Legacy port-I/O devices of a PC that a Linux guest needs: the 16550 console and the i8042
//! (reset line, and a keyboard for Ctrl+Alt+Del).

pub mod i8042;
pub mod serial;

pub use i8042::I8042;
pub use serial::{ConsoleWatch, SerialConsole, SerialConstructorArgs, SerialError, SerialState};
