//! `dormouse cp`: copy files between this host and a running VM through its guest agent. One side
//! is `vm:/absolute/path`. As with cp(1), a destination that is an existing directory (or ends
//! in `/`) receives the source under its own name; `-r` copies directories.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use agent_client::{AgentClient, FileKind, WriteOptions};
use vmm_api::agent_link::connect_agent;

const VM_PREFIX: &str = "vm:";

#[derive(Args)]
pub struct CpArgs {
    /// The VM's API socket (the path given to `dormouse run --api-sock`).
    #[arg(long)]
    pub sock: PathBuf,
    /// Seconds to wait for the guest agent to be ready.
    #[arg(long, default_value_t = 60)]
    pub wait: u64,
    /// Copy directories recursively.
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// Source: a host path, or `vm:/path` in the guest.
    pub src: String,
    /// Destination: a host path, or `vm:/path` in the guest.
    pub dest: String,
}

enum Direction {
    ToGuest { local: PathBuf, guest: String },
    FromGuest { guest: String, local: PathBuf },
}

fn guest_path(text: &str) -> Option<anyhow::Result<String>> {
    let path = text.strip_prefix(VM_PREFIX)?;
    Some(if path.starts_with('/') {
        Ok(path.to_owned())
    } else {
        Err(anyhow::anyhow!(
            "guest paths must be absolute: `{text}` (write vm:/path)"
        ))
    })
}

fn direction(src: &str, dest: &str) -> anyhow::Result<Direction> {
    match (guest_path(src), guest_path(dest)) {
        (None, Some(guest)) => Ok(Direction::ToGuest {
            local: PathBuf::from(src),
            guest: guest?,
        }),
        (Some(guest), None) => Ok(Direction::FromGuest {
            guest: guest?,
            local: PathBuf::from(dest),
        }),
        (Some(_), Some(_)) => bail!("both paths are in the VM; use `dormouse exec -- cp` there"),
        (None, None) => bail!("one of the paths must be in the VM (vm:/path)"),
    }
}

/// The last component of a path, for "copy into this directory".
fn base_name(path: &str) -> anyhow::Result<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|name| !name.is_empty() && *name != "." && *name != "..")
        .with_context(|| format!("`{path}` has no file name to copy under"))
}

fn join_guest(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

pub fn cp(args: CpArgs) -> anyhow::Result<i32> {
    let direction = direction(&args.src, &args.dest)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let (client, _) = connect_agent(&args.sock, Duration::from_secs(args.wait)).await?;
        match direction {
            Direction::ToGuest { local, guest } => {
                upload(&client, &local, &guest, args.recursive).await
            }
            Direction::FromGuest { guest, local } => {
                download(&client, &guest, &local, args.recursive).await
            }
        }
    })?;
    Ok(0)
}

async fn guest_is_dir(client: &AgentClient, path: &str) -> bool {
    matches!(client.stat(path).await, Ok(info) if info.is_dir())
}

async fn upload(
    client: &AgentClient,
    local: &Path,
    guest: &str,
    recursive: bool,
) -> anyhow::Result<()> {
    let meta = std::fs::metadata(local).with_context(|| format!("{}", local.display()))?;
    let name = base_name(local.to_str().context("host path is not UTF-8")?)?.to_owned();
    let target = if guest.ends_with('/') || guest_is_dir(client, guest).await {
        join_guest(guest, &name)
    } else {
        guest.to_owned()
    };
    if !meta.is_dir() {
        return upload_file(client, local, &target, meta.permissions().mode()).await;
    }
    if !recursive {
        bail!("{} is a directory (use -r)", local.display());
    }
    // Depth-first over the host tree; directories are created before their contents.
    let mut pending = vec![(local.to_path_buf(), target)];
    while let Some((dir, guest_dir)) = pending.pop() {
        client
            .mkdir(&guest_dir, true)
            .await
            .with_context(|| format!("vm:{guest_dir}"))?;
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let entry = entry.with_context(|| format!("{}", dir.display()))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name
                .to_str()
                .with_context(|| format!("{}: name is not UTF-8", path.display()))?;
            let guest_path = join_guest(&guest_dir, name);
            let meta = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?;
            if meta.is_dir() {
                pending.push((path, guest_path));
            } else {
                upload_file(client, &path, &guest_path, meta.permissions().mode()).await?;
            }
        }
    }
    Ok(())
}

async fn upload_file(
    client: &AgentClient,
    local: &Path,
    guest: &str,
    mode: u32,
) -> anyhow::Result<()> {
    let file = tokio::fs::File::open(local)
        .await
        .with_context(|| format!("{}", local.display()))?;
    let options = WriteOptions {
        mode: mode & 0o7777,
        create_parents: false,
        append: false,
    };
    client
        .write_file_from(guest, file, options)
        .await
        .with_context(|| format!("writing vm:{guest}"))?;
    Ok(())
}

async fn download(
    client: &AgentClient,
    guest: &str,
    local: &Path,
    recursive: bool,
) -> anyhow::Result<()> {
    let info = client
        .stat(guest)
        .await
        .with_context(|| format!("vm:{guest}"))?;
    let target = if local.is_dir() || local.to_str().is_some_and(|l| l.ends_with('/')) {
        local.join(base_name(guest)?)
    } else {
        local.to_path_buf()
    };
    if !info.is_dir() {
        return download_file(client, guest, &target, info.mode).await;
    }
    if !recursive {
        bail!("vm:{guest} is a directory (use -r)");
    }
    let mut pending = vec![(guest.to_owned(), target)];
    while let Some((guest_dir, dir)) = pending.pop() {
        std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
        let entries = client
            .list_dir(&guest_dir)
            .await
            .with_context(|| format!("vm:{guest_dir}"))?;
        for entry in entries {
            let guest_path = join_guest(&guest_dir, &entry.name);
            let path = dir.join(&entry.name);
            match entry.kind {
                FileKind::Dir => pending.push((guest_path, path)),
                FileKind::File => download_file(client, &guest_path, &path, entry.mode).await?,
                _ => eprintln!("dormouse cp: skipping vm:{guest_path} (not a regular file)"),
            }
        }
    }
    Ok(())
}

async fn download_file(
    client: &AgentClient,
    guest: &str,
    local: &Path,
    mode: u32,
) -> anyhow::Result<()> {
    let mut file = tokio::fs::File::create(local)
        .await
        .with_context(|| format!("{}", local.display()))?;
    client
        .read_file_to(guest, &mut file)
        .await
        .with_context(|| format!("reading vm:{guest}"))?;
    if mode != 0 {
        std::fs::set_permissions(local, std::fs::Permissions::from_mode(mode & 0o7777))
            .with_context(|| format!("{}", local.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_and_names() {
        assert!(matches!(
            direction("a.txt", "vm:/tmp/").unwrap(),
            Direction::ToGuest { guest, .. } if guest == "/tmp/"
        ));
        assert!(matches!(
            direction("vm:/etc/hostname", ".").unwrap(),
            Direction::FromGuest { guest, .. } if guest == "/etc/hostname"
        ));
        assert!(direction("a", "b").is_err());
        assert!(direction("vm:/a", "vm:/b").is_err());
        assert!(direction("a", "vm:relative").is_err());
        assert_eq!(base_name("/x/y/").unwrap(), "y");
        assert_eq!(base_name("file").unwrap(), "file");
        assert!(base_name("/").is_err());
        assert_eq!(join_guest("/tmp/", "f"), "/tmp/f");
    }
}
