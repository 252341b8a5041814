//! Compiles `proto/herald/v1/herald.proto` with protox (pure Rust, no `protoc`) into the
//! tonic client code of [`crate::grpc`]. The server crate compiles the same file for its
//! side; both read the one proto in the repository.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = proto_root.join("herald/v1/herald.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&proto_root])?;
    tonic_prost_build::configure().build_server(false).build_client(true).bytes(".").compile_fds(fds)?;
    Ok(())
}
