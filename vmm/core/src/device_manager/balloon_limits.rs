//! What balloon target a VM can take: never more than its memory (the driver would try to give
//! back pages it does not have, and the guest would end up out of memory).

/// Checks a balloon target against the VM's memory size.
pub fn check_balloon_target(target_mib: u32, mem_mib: u64) -> Result<(), String> {
    if u64::from(target_mib) > mem_mib {
        return Err(format!(
            "balloon target {target_mib} MiB is larger than the VM's {mem_mib} MiB of memory"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_up_to_the_memory_size_are_allowed() {
        assert!(check_balloon_target(0, 256).is_ok());
        assert!(check_balloon_target(256, 256).is_ok());
        assert!(check_balloon_target(257, 256)
            .unwrap_err()
            .contains("257 MiB"));
    }
}
