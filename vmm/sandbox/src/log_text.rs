//! Reading what a sandbox wrote to a log file: the end of the file, and its lines without
//! terminal escape sequences. Shared by the console log (a guest panic's last lines) and the
//! process exit reason (a sandbox process's last stderr line).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// At most the last `max` bytes of `path` (empty when it cannot be read).
pub(crate) fn read_tail(path: &Path, max: u64) -> Vec<u8> {
    let Ok(mut file) = File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut bytes = Vec::new();
    let _ = file.take(max).read_to_end(&mut bytes);
    bytes
}

/// `line` without ANSI escape sequences (terminal colours in log lines).
pub(crate) fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ … final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_go_and_the_rest_stays() {
        assert_eq!(strip_ansi("\u{1b}[31mred\u{1b}[0m x\r"), "red x\r");
    }

    #[test]
    fn the_tail_is_the_end_and_never_more() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "0123456789").unwrap();
        assert_eq!(read_tail(&path, 4), b"6789");
        assert_eq!(read_tail(&path, 100), b"0123456789");
        assert!(read_tail(&dir.path().join("missing"), 4).is_empty());
    }
}
