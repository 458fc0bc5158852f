//! The two threads of a live snapshot (`snapshot-writer`, `snapshot-faults`): they copy guest
//! memory into the snapshot's memory file with positioned writes, wait for the guest's writes
//! to write-protected pages on the userfaultfd (and for the writer's "done" eventfd), and lift
//! the protection with `UFFDIO_WRITEPROTECT`. They open nothing: the file and both fds are
//! made by the API thread that starts them.

use super::rules::Rules;

pub(super) fn rules() -> Rules {
    let userfaultfd_ioctls: Vec<u32> = snapshot::USERFAULTFD_IOCTLS
        .iter()
        .map(|&request| request as u32)
        .collect();
    Rules::base().ioctls(&userfaultfd_ioctls).allow_all(&[
        libc::SYS_pwrite64,
        libc::SYS_pwritev,
        libc::SYS_read,
        libc::SYS_poll,
        libc::SYS_ppoll,
    ])
}
