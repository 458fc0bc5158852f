//! Trimming the resident set of a long-running VMM process after start.
//!
//! Most of an idle VMM's RSS is read-only file pages (the binary's and libraries' code and
//! constants) that were mapped while starting: the kernel maps up to 64 KiB around every page
//! fault, so one start maps megabytes of code that the idle process never runs again. Those
//! pages stay in the page cache, shared by every VMM on the host; dropping this process's
//! mappings of them costs a minor fault when a piece of code runs again.

/// A private, file-backed mapping that cannot be written and holds no private copies of pages:
/// dropping its page-table entries loses nothing (the pages come back from the file).
fn droppable(perms: &str, path: Option<&str>, anonymous_kib: u64) -> bool {
    let mut p = perms.chars();
    let (r, w, _x, private) = (p.next(), p.next(), p.next(), p.next());
    r == Some('r')
        && w == Some('-')
        && private == Some('p')
        && path.is_some_and(|p| p.starts_with('/'))
        && anonymous_kib == 0
}

/// The mappings `droppable` accepts, as (start, length), from the text of /proc/self/smaps.
fn droppable_ranges(smaps: &str) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    // (start, end, permissions, path) of the mapping whose fields are being read.
    let mut current: Option<(usize, usize, &str, Option<&str>)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) {
                let perms = fields.next().unwrap_or("");
                let path = fields.nth(3);
                current = Some((start, end, perms, path));
                continue;
            }
        }
        if first == "Anonymous:" {
            let kib = fields
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX);
            if let Some((start, end, perms, path)) = current.take() {
                if end > start && droppable(perms, path, kib) {
                    ranges.push((start, end - start));
                }
            }
        }
    }
    ranges
}

/// Drops this process's page-table entries for read-only file mappings (code and constants);
/// returns how many bytes of mappings were trimmed.
pub fn trim_file_mappings() -> usize {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut trimmed = 0;
    for (start, len) in droppable_ranges(&smaps) {
        // SAFETY: a private file mapping without write permission and without private
        // (anonymous) pages, so none can appear while we run: MADV_DONTNEED only unmaps page
        // cache pages, which the next access maps again with the same contents.
        if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) } == 0 {
            trimmed += len;
        }
    }
    trimmed
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0100000 r--p 00000000 fe:00 123 /usr/bin/dormouse
Size:               1024 kB
Anonymous:             0 kB
55d0a0100000-55d0a0400000 r-xp 00100000 fe:00 123 /usr/bin/dormouse
Size:               3072 kB
Anonymous:             0 kB
55d0a0400000-55d0a0420000 r--p 00400000 fe:00 123 /usr/bin/dormouse
Size:                128 kB
Anonymous:           124 kB
55d0a0420000-55d0a0421000 rw-p 00420000 fe:00 123 /usr/bin/dormouse
Anonymous:             4 kB
7f0000000000-7f0000001000 r-xp 00000000 00:00 0 [vdso]
Anonymous:             0 kB
7f0000002000-7f0000003000 r--s 00000000 fe:00 9 /dev/shm/x
Anonymous:             0 kB
";

    #[test]
    fn only_unwritten_read_only_private_file_mappings_are_dropped() {
        // The relocated (RELRO) segment has private pages, the data segment is writable,
        // vdso has no file, the shared mapping is not private: all kept.
        assert_eq!(
            droppable_ranges(SMAPS),
            vec![(0x55d0a0000000, 0x100000), (0x55d0a0100000, 0x300000)]
        );
    }

    #[test]
    fn trimming_this_process_keeps_it_working() {
        let before = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(
            trim_file_mappings() > 0,
            "the test binary's code is droppable"
        );
        // Code and constants come back on use.
        let after = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(before.contains("VmRSS") && after.contains("VmRSS"));
    }
}
