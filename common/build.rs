//! Generates the `lockstep.v1` protobuf and gRPC code with a vendored `protoc`, so a fresh
//! machine needs nothing beyond the Rust toolchain.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded, so setting the variable races nothing.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=../proto");
    tonic_prost_build::configure()
        .bytes(".lockstep.v1")
        .compile_protos(&["../proto/lockstep/v1/replication.proto"], &["../proto"])?;
    Ok(())
}
