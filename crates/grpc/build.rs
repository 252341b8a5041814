//! Compiles `proto/herald/v1/herald.proto` with protox (a protobuf compiler in pure
//! Rust, so no system `protoc` is needed) and generates the tonic server code.
//!
//! The server's stream item `SubscribeEvent` is mapped to a hand-written type that
//! carries pre-encoded bytes (`crate::encoded::EncodedEvent`), so a message fanned out
//! to many subscribers is serialised once. The descriptor set is also written out for
//! server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let file = proto_root.join("herald/v1/herald.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&proto_root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("herald_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .bytes(".")
        .extern_path(".herald.v1.SubscribeEvent", "crate::encoded::EncodedEvent")
        .compile_fds(fds)?;
    Ok(())
}
