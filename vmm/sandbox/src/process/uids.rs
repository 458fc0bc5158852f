//! Per-sandbox uids for jailed processes: one per live sandbox process, from the manager's
//! range, reused after it ends. The pool is process-wide, so two managers with overlapping
//! ranges never hand out the same uid.

use std::collections::BTreeSet;
use std::sync::Mutex;

static IN_USE: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// A uid (used as the gid too) held until dropped.
#[derive(Debug)]
pub(crate) struct UidLease(u32);

impl UidLease {
    pub fn uid(&self) -> u32 {
        self.0
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        IN_USE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

/// The lowest free uid in `first .. first + count`.
pub(crate) fn lease(first: u32, count: u32) -> Option<UidLease> {
    let mut used = IN_USE.lock().unwrap_or_else(|e| e.into_inner());
    let end = first.saturating_add(count);
    let uid = (first..end).find(|uid| !used.contains(uid))?;
    used.insert(uid);
    Some(UidLease(uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_and_reused_after_drop() {
        // A range no other test uses.
        let first = 3_000_000;
        let a = lease(first, 3).unwrap();
        let b = lease(first, 3).unwrap();
        let c = lease(first, 3).unwrap();
        assert_eq!((a.uid(), b.uid(), c.uid()), (first, first + 1, first + 2));
        assert!(lease(first, 3).is_none(), "the range is exhausted");
        drop(b);
        assert_eq!(lease(first, 3).unwrap().uid(), first + 1);
        // Another manager's overlapping range skips what is leased.
        let d = lease(first + 2, 2).unwrap();
        assert_eq!(d.uid(), first + 3);
    }
}
