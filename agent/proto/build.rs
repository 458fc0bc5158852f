//! Generates the gRPC stubs from `dormouse/agent/v1/agent.proto` (beside this file).
//!
//! `protoc` comes from the `protoc-bin-vendored` crate (no download, no
//! system package needed); `PROTOC` in the environment overrides it.

use std::path::PathBuf;

const PROTO: &str = "dormouse/agent/v1/agent.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-env-changed=PROTOC");

    let mut config = tonic_prost_build::Config::new();
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    config.protoc_executable(protoc);

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &[PROTO], &["."])?;
    Ok(())
}
