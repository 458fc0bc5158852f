//! CPU time of the calling thread (getrusage RUSAGE_THREAD), split into user and system.
//! The kernel scales the user/system split so their sum is the thread's exact runtime, so the
//! total is precise even where the split itself is tick-sampled.

use std::ops::{Add, AddAssign, Sub};
use std::time::Duration;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    /// This thread's CPU time so far; zero if getrusage fails (it cannot with these arguments).
    pub fn of_this_thread() -> Self {
        // SAFETY: rusage is plain old data; all-zeroes is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes one rusage into `ru`, which we own and which outlives the call.
        let ret = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
        if ret != 0 {
            return Self::default();
        }
        Self {
            user: timeval(ru.ru_utime),
            system: timeval(ru.ru_stime),
        }
    }

    pub fn total(&self) -> Duration {
        self.user + self.system
    }
}

fn timeval(t: libc::timeval) -> Duration {
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let micros = u64::try_from(t.tv_usec).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(micros)
}

impl Sub for CpuTime {
    type Output = CpuTime;
    fn sub(self, rhs: Self) -> Self {
        Self {
            user: self.user.saturating_sub(rhs.user),
            system: self.system.saturating_sub(rhs.system),
        }
    }
}

impl Add for CpuTime {
    type Output = CpuTime;
    fn add(self, rhs: Self) -> Self {
        Self {
            user: self.user + rhs.user,
            system: self.system + rhs.system,
        }
    }
}

impl AddAssign for CpuTime {
    fn add_assign(&mut self, rhs: Self) {
        *self = *self + rhs;
    }
}

/// Accumulates the CPU time the calling thread spends inside `measure` calls.
#[derive(Debug, Default)]
pub struct CpuMeter {
    total: CpuTime,
}

impl CpuMeter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn measure<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let before = CpuTime::of_this_thread();
        let out = f();
        self.total += CpuTime::of_this_thread() - before;
        out
    }

    pub fn total(&self) -> CpuTime {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent reference: the scheduler's exact runtime of this thread.
    fn thread_clock() -> Duration {
        // SAFETY: timespec is plain old data; clock_gettime writes one into `ts`.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: as above; CLOCK_THREAD_CPUTIME_ID is always available on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn measures_busy_work_but_not_sleep() {
        let mut meter = CpuMeter::new();
        // Spin for 20 ms of CPU (not wall) time: other tests share the cores.
        meter.measure(|| {
            let start = thread_clock();
            let mut x = 0u64;
            while thread_clock() - start < Duration::from_millis(20) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        });
        let busy = meter.total().total();
        assert!(
            busy >= Duration::from_millis(15) && busy < Duration::from_millis(60),
            "20 ms of spinning measured as {busy:?}"
        );
        meter.measure(|| std::thread::sleep(Duration::from_millis(50)));
        let slept = meter.total().total() - busy;
        assert!(
            slept < Duration::from_millis(10),
            "sleep measured {slept:?}"
        );
    }
}
