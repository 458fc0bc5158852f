//! Small task helpers: blocking work on tokio's blocking pool, lifecycle steps as their own
//! tasks, agent calls with a deadline.

use std::future::Future;
use std::time::Duration;

use super::error::{Result, SandboxError};
use super::SandboxId;

/// Runs `f` on tokio's blocking pool.
pub async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| SandboxError::TaskLost(what))
}

/// Runs `f` for a start on the sandbox's critical path: on this worker thread where the
/// runtime allows it (`block_in_place` on a multi-threaded runtime), else as [`blocking`]. A
/// start's restore into a warm shell takes well under a millisecond; the blocking pool's two
/// thread hand-offs (there and back) added 0.1–2 ms to it on a busy host. Like
/// [`blocking`], `f` runs to its end even if the caller stops waiting (it runs inside this
/// poll), and a panic in it is an error, not the caller's panic.
pub async fn blocking_in_place<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let multi_threaded = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if !multi_threaded {
        return blocking(what, f).await;
    }
    let mut job = Some(f);
    // tokio refuses (panics) before running anything where this thread may not block, e.g.
    // under another runtime's `block_on` with this one's handle entered: the pool then.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tokio::task::block_in_place(|| {
            job.take()
                .map(|f| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)))
        })
    }));
    match (ran, job) {
        (Ok(Some(Ok(value))), _) => Ok(value),
        (Err(_), Some(f)) => blocking(what, f).await,
        _ => Err(SandboxError::TaskLost(what)),
    }
}

/// Runs `fut` as its own task, so a caller that stops waiting (a dropped future, a timeout)
/// cannot leave a sandbox half-hibernated: the step completes either way.
pub async fn detached<T: Send + 'static>(
    what: &'static str,
    fut: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(fut)
        .await
        .map_err(|_| SandboxError::TaskLost(what))?
}

pub async fn agent_call<T>(
    id: &SandboxId,
    operation: &'static str,
    timeout: Duration,
    call: impl Future<Output = std::result::Result<T, agent_client::ClientError>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(|source| SandboxError::agent(id, operation, source)),
        Err(_) => Err(SandboxError::AgentTimeout {
            id: id.clone(),
            operation,
            timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_place_runs_on_this_thread_of_a_multi_threaded_runtime() {
        let here = std::thread::current().id();
        let ran_on = blocking_in_place("test", || std::thread::current().id())
            .await
            .expect("ran");
        assert_eq!(ran_on, here);
    }

    #[test]
    fn in_place_falls_back_to_the_pool_on_a_current_thread_runtime() {
        let here = std::thread::current().id();
        let ran_on = current_thread()
            .block_on(blocking_in_place("test", || std::thread::current().id()))
            .expect("ran");
        assert_ne!(ran_on, here);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_in_place_is_an_error_and_the_runtime_goes_on() {
        let lost = blocking_in_place("exploding", || -> u8 { panic!("boom") }).await;
        assert!(
            matches!(lost, Err(SandboxError::TaskLost("exploding"))),
            "{lost:?}"
        );
        assert_eq!(blocking_in_place("after", || 7).await.expect("ran"), 7);
    }

    #[test]
    fn in_place_under_another_runtimes_block_on_uses_the_pool() {
        // This runtime's handle entered inside a current-thread runtime's block_on: tokio
        // refuses to block in place there, and the pool runs it instead.
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        let handle = multi.handle().clone();
        let here = std::thread::current().id();
        let ran_on = current_thread().block_on(async move {
            let _entered = handle.enter();
            blocking_in_place("test", || std::thread::current().id()).await
        });
        assert_ne!(ran_on.expect("ran"), here);
    }
}
