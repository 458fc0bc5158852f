//! The VMM core stays small and synchronous: with its default features it links no async
//! runtime, no gRPC stack, no object-storage client and none of the agent's crates
//! (docs/architecture.md). `cargo tree`
//! answers from the lock file, so this is quick and offline.

use std::process::Command;

fn normal_dependencies(features: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "tree",
        "--offline",
        "-e",
        "normal",
        "--prefix",
        "none",
        "-p",
        "vmm",
    ])
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    let out = cmd.output().expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn crate_names(tree: &str) -> Vec<String> {
    tree.lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_core_links_no_async_runtime_grpc_or_agent_code() {
    let names = crate_names(&normal_dependencies(&[]));
    assert!(names.iter().any(|n| n == "kvm-ioctls"), "{names:?}");
    for forbidden in [
        "tokio",
        "tonic",
        "prost",
        "hyper",
        "agent",
        "agent-client",
        "agent-proto",
        "vmm-api",
        "vmm-sandbox",
        "clap",
        // Object storage (HTTP client, TLS) belongs to the snapshot store, above the core.
        "snapshot-store",
        "object_store",
        "reqwest",
    ] {
        assert!(
            !names.iter().any(|n| n == forbidden),
            "the VMM core depends on {forbidden}: {names:?}"
        );
    }
}

#[test]
fn the_async_feature_adds_tokio_and_nothing_of_grpc() {
    let names = crate_names(&normal_dependencies(&["async"]));
    assert!(names.iter().any(|n| n == "tokio"), "{names:?}");
    assert!(!names.iter().any(|n| n == "tonic" || n.starts_with("agent")));
}
