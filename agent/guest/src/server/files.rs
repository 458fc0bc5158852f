//! File-system handlers. Blocking std::fs calls run on the blocking pool.

use std::fs::{self, DirBuilder, File, Metadata, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::paths::{guest_path, is_root};
use super::status::{check_size, invalid, io_status};
use crate::proto::{
    write_file_request::Msg, ExistsResponse, FileChunk, FileInfo, FileType, ListDirResponse,
    ReadFileRequest, WriteFileHeader, WriteFileRequest, WriteFileResponse,
};
use agent_proto::limits::{DEFAULT_READ_CHUNK, MAX_PAYLOAD_BYTES, MAX_READ_CHUNK};

/// Runs blocking file-system work off the async runtime.
async fn blocking<T, F>(work: F) -> Result<T, Status>
where
    F: FnOnce() -> Result<T, Status> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| Status::internal(format!("file task failed: {err}")))?
}

fn file_type(metadata: &Metadata) -> FileType {
    let kind = metadata.file_type();
    if kind.is_symlink() {
        FileType::Symlink
    } else if kind.is_dir() {
        FileType::Directory
    } else if kind.is_file() {
        FileType::File
    } else {
        FileType::Other
    }
}

fn file_info(path: &Path, metadata: &Metadata) -> FileInfo {
    let mtime_unix_nanos = metadata
        .modified()
        .ok()
        .and_then(|mtime| mtime.duration_since(UNIX_EPOCH).ok())
        .and_then(|since| i64::try_from(since.as_nanos()).ok())
        .unwrap_or_default();
    let symlink_target = if metadata.file_type().is_symlink() {
        fs::read_link(path)
            .map(|target| target.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        String::new()
    };
    FileInfo {
        name: path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".to_owned()),
        r#type: file_type(metadata).into(),
        size: metadata.len(),
        mode: metadata.mode() & 0o7777,
        uid: metadata.uid(),
        gid: metadata.gid(),
        mtime_unix_nanos,
        symlink_target,
    }
}

pub type ChunkStream = ReceiverStream<Result<FileChunk, Status>>;

/// Streams `[offset, offset + length)` of a regular file in chunks.
pub async fn read_file(request: ReadFileRequest) -> Result<ChunkStream, Status> {
    let path = guest_path("path", &request.path)?;
    let chunk_size = match request.chunk_size {
        0 => DEFAULT_READ_CHUNK,
        size => usize::try_from(size)
            .unwrap_or(MAX_READ_CHUNK)
            .min(MAX_READ_CHUNK),
    };
    let opened_path = path.clone();
    let file = blocking(move || {
        let context = || format!("cannot read {}", opened_path.display());
        let mut file = File::open(&opened_path).map_err(|err| io_status(context(), &err))?;
        let metadata = file.metadata().map_err(|err| io_status(context(), &err))?;
        if metadata.is_dir() {
            return Err(invalid(format!("{} is a directory", opened_path.display())));
        }
        if request.offset > 0 {
            file.seek(SeekFrom::Start(request.offset))
                .map_err(|err| io_status(context(), &err))?;
        }
        Ok(file)
    })
    .await?;

    let (sender, receiver) = mpsc::channel(4);
    let remaining = (request.length > 0).then_some(request.length);
    tokio::task::spawn_blocking(move || {
        stream_chunks(file, &path, request.offset, remaining, chunk_size, &sender)
    });
    Ok(ReceiverStream::new(receiver))
}

fn stream_chunks(
    mut file: File,
    path: &Path,
    mut offset: u64,
    mut remaining: Option<u64>,
    chunk_size: usize,
    sender: &mpsc::Sender<Result<FileChunk, Status>>,
) {
    loop {
        let want = match remaining {
            Some(0) => return,
            Some(left) => usize::try_from(left).unwrap_or(chunk_size).min(chunk_size),
            None => chunk_size,
        };
        let mut data = vec![0u8; want];
        let read = match read_full(&mut file, &mut data) {
            Ok(read) => read,
            Err(err) => {
                let status = io_status(format!("cannot read {}", path.display()), &err);
                let _ = sender.blocking_send(Err(status));
                return;
            }
        };
        if read == 0 {
            return;
        }
        data.truncate(read);
        let chunk = FileChunk { offset, data };
        let read = read as u64;
        offset = offset.saturating_add(read);
        remaining = remaining.map(|left| left.saturating_sub(read));
        if sender.blocking_send(Ok(chunk)).is_err() {
            return; // client went away
        }
    }
}

/// Fills `buffer` unless EOF comes first; returns the bytes read.
fn read_full(file: &mut File, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while let Some(rest) = buffer.get_mut(filled..) {
        if rest.is_empty() {
            break;
        }
        match file.read(rest) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

/// Receives the header, then data chunks, writing them as they arrive.
pub async fn write_file(
    mut requests: Streaming<WriteFileRequest>,
) -> Result<WriteFileResponse, Status> {
    let header = match requests.message().await?.and_then(|request| request.msg) {
        Some(Msg::Header(header)) => header,
        _ => return Err(invalid("the first message must be `header`")),
    };
    let path = guest_path("path", &header.path)?;
    let mut file = Some(open_for_write(path.clone(), header).await?);
    let mut written: u64 = 0;
    while let Some(request) = requests.message().await? {
        let data = match request.msg {
            Some(Msg::Data(data)) => data,
            Some(Msg::Header(_)) => return Err(invalid("`header` may only be sent first")),
            None => continue,
        };
        check_size("data chunk", data.len(), MAX_PAYLOAD_BYTES)?;
        let Some(mut current) = file.take() else {
            return Err(Status::internal("file handle lost"));
        };
        let context_path = path.clone();
        let length = data.len() as u64;
        current = blocking(move || {
            current.write_all(&data).map_err(|err| {
                io_status(format!("cannot write {}", context_path.display()), &err)
            })?;
            Ok(current)
        })
        .await?;
        file = Some(current);
        written = written.saturating_add(length);
    }
    Ok(WriteFileResponse {
        bytes_written: written,
    })
}

async fn open_for_write(path: PathBuf, header: WriteFileHeader) -> Result<File, Status> {
    blocking(move || {
        let context = || format!("cannot write {}", path.display());
        if header.create_parents {
            if let Some(parent) = path.parent() {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(|err| io_status(context(), &err))?;
            }
        }
        let mode = match header.mode & 0o7777 {
            0 => 0o644,
            mode => mode,
        };
        let mut options = OpenOptions::new();
        options.write(true).create(true).mode(mode);
        if header.append {
            options.append(true);
        } else {
            options.truncate(true);
        }
        let file = options
            .open(&path)
            .map_err(|err| io_status(context(), &err))?;
        if header.mode != 0 {
            // The umask trims the creation mode; apply exactly what was asked.
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|err| io_status(context(), &err))?;
        }
        Ok(file)
    })
    .await
}

pub async fn list_dir(raw_path: &str) -> Result<ListDirResponse, Status> {
    let path = guest_path("path", raw_path)?;
    blocking(move || {
        let context = || format!("cannot list {}", path.display());
        let mut entries = Vec::new();
        for entry in fs::read_dir(&path).map_err(|err| io_status(context(), &err))? {
            let entry = entry.map_err(|err| io_status(context(), &err))?;
            let entry_path = entry.path();
            match fs::symlink_metadata(&entry_path) {
                Ok(metadata) => entries.push(file_info(&entry_path, &metadata)),
                // Deleted while listing: skip it.
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_status(context(), &err)),
            }
        }
        entries.sort_by(|left, right| left.name.cmp(&right.name));
        Ok(ListDirResponse { entries })
    })
    .await
}

pub async fn stat(raw_path: &str, follow_symlinks: bool) -> Result<FileInfo, Status> {
    let path = guest_path("path", raw_path)?;
    blocking(move || {
        let metadata = if follow_symlinks {
            fs::metadata(&path)
        } else {
            fs::symlink_metadata(&path)
        }
        .map_err(|err| io_status(format!("cannot stat {}", path.display()), &err))?;
        Ok(file_info(&path, &metadata))
    })
    .await
}

pub async fn make_dir(raw_path: &str, mode: u32, parents: bool) -> Result<(), Status> {
    let path = guest_path("path", raw_path)?;
    blocking(move || {
        let mode = match mode & 0o7777 {
            0 => 0o755,
            mode => mode,
        };
        DirBuilder::new()
            .recursive(parents)
            .mode(mode)
            .create(&path)
            .map_err(|err| io_status(format!("cannot create directory {}", path.display()), &err))
    })
    .await
}

pub async fn remove(raw_path: &str, recursive: bool) -> Result<(), Status> {
    let path = guest_path("path", raw_path)?;
    if is_root(&path) {
        return Err(invalid("refusing to remove the root directory"));
    }
    blocking(move || {
        let context = || format!("cannot remove {}", path.display());
        let metadata = fs::symlink_metadata(&path).map_err(|err| io_status(context(), &err))?;
        let result = if !metadata.is_dir() {
            fs::remove_file(&path)
        } else if recursive {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_dir(&path)
        };
        result.map_err(|err| io_status(context(), &err))
    })
    .await
}

pub async fn exists(raw_path: &str) -> Result<ExistsResponse, Status> {
    let path = guest_path("path", raw_path)?;
    blocking(move || match fs::symlink_metadata(&path) {
        Ok(metadata) => Ok(ExistsResponse {
            exists: true,
            r#type: file_type(&metadata).into(),
        }),
        Err(err)
            if err.kind() == io::ErrorKind::NotFound
                || err.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            Ok(ExistsResponse::default())
        }
        Err(err) => Err(io_status(format!("cannot check {}", path.display()), &err)),
    })
    .await
}

pub async fn rename(raw_from: &str, raw_to: &str) -> Result<(), Status> {
    let from = guest_path("from", raw_from)?;
    let to = guest_path("to", raw_to)?;
    blocking(move || {
        fs::rename(&from, &to).map_err(|err| {
            io_status(
                format!("cannot rename {} to {}", from.display(), to.display()),
                &err,
            )
        })
    })
    .await
}
