//! The boot script PID 1 starts once it listens (`/etc/dormouse/rc`): network
//! set-up, a shell on the console, or a one-shot command. It inherits the
//! agent's stdio (the console) and is spawned through the reaper like every
//! other child, so its status is never lost nor stolen.

use std::path::PathBuf;
use std::process::Command;

use super::reaper::reaper;

/// Starts `path` if it exists and logs how it ended. Returns when it has.
pub async fn run_boot_script(path: PathBuf) {
    if !path.is_file() {
        tracing::debug!(path = %path.display(), "no boot script");
        return;
    }
    let mut command = Command::new(&path);
    command.current_dir("/");
    let spawn = tokio::task::spawn_blocking(move || reaper().spawn(&mut command)).await;
    let exit = match spawn {
        Ok(Ok((child, exit))) => {
            tracing::info!(path = %path.display(), pid = child.id(), "boot script started");
            // Dropping the child neither waits nor kills: the reaper owns its status.
            drop(child);
            exit
        }
        Ok(Err(err)) => {
            tracing::warn!(path = %path.display(), %err, "cannot start the boot script");
            return;
        }
        Err(err) => {
            tracing::warn!(%err, "boot script spawn task failed");
            return;
        }
    };
    match exit.await {
        Ok(status) if libc::WIFEXITED(status) => {
            tracing::info!(code = libc::WEXITSTATUS(status), "boot script exited")
        }
        Ok(status) => tracing::info!(status, "boot script ended"),
        Err(_) => tracing::debug!("boot script status dropped"),
    }
}
