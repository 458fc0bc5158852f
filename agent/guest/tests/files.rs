//! File operations against an in-process agent.

mod common;

use agent::proto::{write_file_request, WriteFileHeader, WriteFileRequest};
use agent_client::{FileKind, WriteOptions};
use common::TestAgent;
use sha2::{Digest, Sha256};
use tonic::Code;

fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u8
        })
        .collect()
}

#[tokio::test]
async fn one_mebibyte_round_trip_with_checksum() {
    let agent = TestAgent::start().await;
    let data = pseudo_random(1024 * 1024, 7);
    let path = agent.path("blob.bin");
    let written = agent
        .client
        .write_file(&path, &data, WriteOptions::default())
        .await
        .unwrap();
    assert_eq!(written, data.len() as u64);

    let read = agent.client.read_file(&path).await.unwrap();
    assert_eq!(Sha256::digest(&read), Sha256::digest(&data));
    // The guest sees the same bytes.
    assert_eq!(std::fs::read(&path).unwrap(), data);
    // And the guest's own sha256sum agrees.
    let sum = agent
        .client
        .exec(&agent_client::ExecCommand::new("sha256sum").arg(&path))
        .await
        .unwrap();
    let expected = format!("{:x}", Sha256::digest(&data));
    assert!(sum.stdout_lossy().starts_with(&expected));

    let middle = agent
        .client
        .read_file_range(&path, 1000, 70_000)
        .await
        .unwrap();
    assert_eq!(middle, data[1000..71_000]);
    let tail = agent
        .client
        .read_file_range(&path, data.len() as u64 - 10, 0)
        .await
        .unwrap();
    assert_eq!(tail, data[data.len() - 10..]);
}

#[tokio::test]
async fn mode_append_and_empty_files() {
    let agent = TestAgent::start().await;
    let path = agent.path("script.sh");
    let options = WriteOptions {
        mode: 0o750,
        ..WriteOptions::default()
    };
    agent
        .client
        .write_file(&path, b"#!/bin/sh\n", options)
        .await
        .unwrap();
    let append = WriteOptions {
        append: true,
        ..WriteOptions::default()
    };
    agent
        .client
        .write_file(&path, b"echo appended\n", append)
        .await
        .unwrap();
    let info = agent.client.stat(&path).await.unwrap();
    assert_eq!(info.mode, 0o750);
    assert_eq!(info.size, 24);
    let run = agent
        .client
        .exec(&agent_client::ExecCommand::new(&path))
        .await
        .unwrap();
    assert_eq!(run.stdout, b"appended\n");

    let empty = agent.path("empty");
    assert_eq!(
        agent
            .client
            .write_file(&empty, b"", WriteOptions::default())
            .await
            .unwrap(),
        0
    );
    assert_eq!(agent.client.read_file(&empty).await.unwrap(), b"");
}

#[tokio::test]
async fn special_characters_in_names() {
    let agent = TestAgent::start().await;
    let names = [
        "with space.txt",
        "quote'single\"double",
        "ünïcödé 日本語 🐭",
        "shell $(meta) ; & | > * ?",
        "-leading-dash",
        "new\nline",
    ];
    for (index, name) in names.iter().enumerate() {
        let path = agent.path(name);
        let content = format!("content {index}");
        agent
            .client
            .write_file(&path, content.as_bytes(), WriteOptions::default())
            .await
            .unwrap();
        assert_eq!(
            agent.client.read_file(&path).await.unwrap(),
            content.as_bytes()
        );
        assert!(agent.client.exists(&path).await.unwrap());
    }
    let listed: Vec<String> = agent
        .client
        .list_dir(agent.dir_path().to_str().unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|entry| entry.name)
        .collect();
    for name in names {
        assert!(
            listed.iter().any(|listed| listed == name),
            "{name} missing from {listed:?}"
        );
    }
}

#[tokio::test]
async fn nested_directories_listing_and_stat() {
    let agent = TestAgent::start().await;
    let deep = agent.path("a/b/c/d.txt");
    let parents = WriteOptions {
        create_parents: true,
        ..WriteOptions::default()
    };
    agent
        .client
        .write_file(&deep, b"deep", parents)
        .await
        .unwrap();
    agent
        .client
        .mkdir(&agent.path("a/b/e/f"), true)
        .await
        .unwrap();
    // mkdir -p on an existing directory is fine.
    agent.client.mkdir(&agent.path("a/b"), true).await.unwrap();
    agent
        .client
        .mkdir(&agent.path("a/single"), false)
        .await
        .unwrap();
    std::os::unix::fs::symlink("c/d.txt", agent.dir_path().join("a/b/link")).unwrap();

    let entries = agent.client.list_dir(&agent.path("a/b")).await.unwrap();
    let summary: Vec<(String, FileKind)> = entries
        .iter()
        .map(|entry| (entry.name.clone(), entry.kind))
        .collect();
    assert_eq!(
        summary,
        [
            ("c".to_owned(), FileKind::Dir),
            ("e".to_owned(), FileKind::Dir),
            ("link".to_owned(), FileKind::Symlink),
        ]
    );
    let link = entries.iter().find(|entry| entry.name == "link").unwrap();
    assert_eq!(link.symlink_target.as_deref(), Some("c/d.txt"));
    assert_eq!(link.path, agent.path("a/b/link"));

    let file = agent.client.stat(&agent.path("a/b/link")).await.unwrap();
    assert!(file.is_file());
    assert_eq!(file.size, 4);
    assert!(file.modified > std::time::UNIX_EPOCH);
    assert_eq!(file.path, agent.path("a/b/link"));
    let dir = agent.client.stat(&agent.path("a/b/e")).await.unwrap();
    assert!(dir.is_dir());
    assert_eq!(dir.mode, 0o755);
}

#[tokio::test]
async fn delete_rename_and_exists() {
    let agent = TestAgent::start().await;
    let options = WriteOptions {
        create_parents: true,
        ..WriteOptions::default()
    };
    agent
        .client
        .write_file(&agent.path("tree/x/1"), b"1", options)
        .await
        .unwrap();
    agent
        .client
        .write_file(&agent.path("tree/2"), b"2", options)
        .await
        .unwrap();

    agent
        .client
        .rename(&agent.path("tree/2"), &agent.path("tree/two"))
        .await
        .unwrap();
    assert!(!agent.client.exists(&agent.path("tree/2")).await.unwrap());
    assert_eq!(
        agent
            .client
            .read_file(&agent.path("tree/two"))
            .await
            .unwrap(),
        b"2"
    );

    agent
        .client
        .remove(&agent.path("tree/two"), false)
        .await
        .unwrap();
    assert!(!agent.client.exists(&agent.path("tree/two")).await.unwrap());

    let not_empty = agent
        .client
        .remove(&agent.path("tree"), false)
        .await
        .unwrap_err();
    assert_eq!(not_empty.code(), Some(Code::FailedPrecondition));
    agent
        .client
        .remove(&agent.path("tree"), true)
        .await
        .unwrap();
    assert!(!agent.client.exists(&agent.path("tree")).await.unwrap());
    assert!(!agent.dir_path().join("tree").exists());
    // Below a regular file: does not exist (ENOTDIR is not an error here).
    std::fs::write(agent.dir_path().join("plain"), "x").unwrap();
    assert!(!agent
        .client
        .exists(&agent.path("plain/child"))
        .await
        .unwrap());
}

fn code<T: std::fmt::Debug>(result: Result<T, agent_client::ClientError>) -> Option<Code> {
    result.unwrap_err().code()
}

#[tokio::test]
async fn file_misuse_returns_grpc_errors() {
    let agent = TestAgent::start().await;
    let client = &agent.client;

    assert_eq!(
        code(client.read_file(&agent.path("missing")).await),
        Some(Code::NotFound)
    );
    assert_eq!(
        code(client.read_file("relative/path").await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(client.read_file("").await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(client.read_file(agent.dir_path().to_str().unwrap()).await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(
            client
                .write_file(
                    &agent.path("no/such/dir/f"),
                    b"x",
                    WriteOptions {
                        create_parents: false,
                        ..WriteOptions::default()
                    }
                )
                .await
        ),
        Some(Code::NotFound)
    );
    // The default creates missing parents, as other sandbox SDKs do.
    client
        .write_file(
            &agent.path("made/by/default/f"),
            b"x",
            WriteOptions::default(),
        )
        .await
        .unwrap();
    assert!(client
        .stat(&agent.path("made/by/default"))
        .await
        .unwrap()
        .is_dir());
    // Even root cannot create files in sysfs.
    assert_eq!(
        code(
            client
                .write_file("/sys/dormouse-test-file", b"x", WriteOptions::default())
                .await
        ),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        code(client.list_dir(&agent.path("missing")).await),
        Some(Code::NotFound)
    );
    assert_eq!(
        code(client.stat(&agent.path("missing")).await),
        Some(Code::NotFound)
    );
    assert_eq!(
        code(client.remove(&agent.path("missing"), true).await),
        Some(Code::NotFound)
    );
    assert_eq!(
        code(client.remove("/", true).await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(client.remove("/tmp/..", true).await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(
            client
                .rename(&agent.path("missing"), &agent.path("other"))
                .await
        ),
        Some(Code::NotFound)
    );
    client.mkdir(&agent.path("d"), false).await.unwrap();
    assert_eq!(
        code(client.mkdir(&agent.path("d"), false).await),
        Some(Code::AlreadyExists)
    );
    assert_eq!(
        code(client.mkdir(&agent.path("x/y"), false).await),
        Some(Code::NotFound)
    );

    // WriteFile: header first, chunks within limits.
    let data_first = client
        .grpc()
        .write_file(tokio_stream::iter([WriteFileRequest {
            msg: Some(write_file_request::Msg::Data(b"x".to_vec())),
        }]))
        .await
        .unwrap_err();
    assert_eq!(data_first.code(), Code::InvalidArgument);
    let header = WriteFileRequest {
        msg: Some(write_file_request::Msg::Header(WriteFileHeader {
            path: agent.path("big"),
            ..WriteFileHeader::default()
        })),
    };
    let huge_chunk = WriteFileRequest {
        msg: Some(write_file_request::Msg::Data(vec![0; 17 * 1024 * 1024])),
    };
    let oversized = client
        .grpc()
        .write_file(tokio_stream::iter([header, huge_chunk]))
        .await
        .unwrap_err();
    assert_eq!(oversized.code(), Code::ResourceExhausted);
}

/// A reader that yields some bytes and then fails.
struct FailingReader {
    remaining: usize,
}

impl tokio::io::AsyncRead for FailingReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(Err(std::io::Error::other("disk on fire")));
        }
        let n = self.remaining.min(buf.remaining()).min(4096);
        buf.put_slice(&vec![b'z'; n]);
        self.remaining -= n;
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn streamed_transfers_and_aborted_upload() {
    let agent = TestAgent::start().await;
    let data = pseudo_random(3 * 1024 * 1024 + 11, 99);
    let path = agent.path("streamed.bin");
    let written = agent
        .client
        .write_file_from(&path, &data[..], WriteOptions::default())
        .await
        .unwrap();
    assert_eq!(written, data.len() as u64);
    let mut copy = Vec::new();
    let copied = agent.client.read_file_to(&path, &mut copy).await.unwrap();
    assert_eq!(copied, data.len() as u64);
    assert_eq!(Sha256::digest(&copy), Sha256::digest(&data));
    // Into an async file (what `dormouse cp` does).
    let local = agent.path("local-copy.bin");
    let mut file = tokio::fs::File::create(&local).await.unwrap();
    agent.client.read_file_to(&path, &mut file).await.unwrap();
    drop(file);
    assert_eq!(
        Sha256::digest(std::fs::read(&local).unwrap()),
        Sha256::digest(&data)
    );

    let failing = FailingReader {
        remaining: 600 * 1024,
    };
    let err = agent
        .client
        .write_file_from(&agent.path("aborted.bin"), failing, WriteOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, agent_client::ClientError::Local(_)), "{err}");
}
