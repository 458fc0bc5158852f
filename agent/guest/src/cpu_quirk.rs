//! A guest whose kernel manages only the legacy FPU/SSE state (no XSAVE, e.g. booted with
//! `clearcpuid=xsave` on a PVM host, where guest ring 0 is emulated) can still let user space
//! see and use AVX: CPUID and XGETBV answer from the host. The guest kernel then does not save
//! the upper halves of the YMM registers across its context switches, and glibc's AVX string
//! functions (memcpy, memset, ...) silently corrupt data in 16-byte pieces. When that is the
//! case the agent tells glibc not to use AVX, for itself (by re-executing itself once) and for
//! every process it starts (they inherit the environment).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

/// glibc's switch; the names are glibc >= 2.33's.
pub const TUNABLES_VAR: &str = "GLIBC_TUNABLES";
/// Shared with the host (which may put it on the guest kernel command line).
pub use agent_proto::NO_AVX_TUNABLE;

/// True when user space may use AVX but the kernel does not preserve its state. Needs /proc.
pub fn avx_state_unmanaged() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx") {
            return false;
        }
        let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
            return false;
        };
        kernel_lacks_xsave(&cpuinfo)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The first `flags` line of /proc/cpuinfo has no `xsave`.
pub fn kernel_lacks_xsave(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find(|line| line.starts_with("flags"))
        .is_some_and(|line| !line.split_whitespace().any(|flag| flag == "xsave"))
}

/// The tunables value with AVX switched off, or `None` if it already is.
pub fn tunables_without_avx(current: Option<&str>) -> Option<String> {
    match current {
        Some(value) if value.contains(NO_AVX_TUNABLE) => None,
        Some(value) if !value.is_empty() => Some(format!("{value}:{NO_AVX_TUNABLE}")),
        _ => Some(NO_AVX_TUNABLE.to_owned()),
    }
}

/// If AVX is unsafe here and glibc was not told yet, re-executes this program with the tunable
/// set (keeping the pid, so PID 1 stays PID 1). Returns only when no re-exec was needed or it
/// failed (the error is returned for logging).
pub fn reexec_without_avx_if_needed() -> Option<String> {
    if !avx_state_unmanaged() {
        return None;
    }
    let current = std::env::var(TUNABLES_VAR).ok();
    let value = tunables_without_avx(current.as_deref())?;
    let mut args = std::env::args_os();
    let argv0 = args
        .next()
        .unwrap_or_else(|| OsString::from("dormouse-agent"));
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .env(TUNABLES_VAR, value)
        .exec();
    Some(format!("cannot re-execute without AVX: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_and_tunables() {
        assert!(kernel_lacks_xsave(
            "processor : 0\nflags : fpu sse sse2 avx\n"
        ));
        assert!(!kernel_lacks_xsave("flags : fpu xsave avx xsaveopt\n"));
        assert!(!kernel_lacks_xsave("no flags here"));
        assert_eq!(tunables_without_avx(None).as_deref(), Some(NO_AVX_TUNABLE));
        assert_eq!(
            tunables_without_avx(Some("glibc.malloc.arena_max=1")),
            Some(format!("glibc.malloc.arena_max=1:{NO_AVX_TUNABLE}"))
        );
        assert_eq!(tunables_without_avx(Some(NO_AVX_TUNABLE)), None);
    }
}
