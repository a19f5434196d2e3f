// Generates the gRPC client for the executor contract. protoc comes from a
// vendored crate so that building needs nothing outside crates.io.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=../proto/tensorgate/v1/executor.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .compile_protos(&["../proto/tensorgate/v1/executor.proto"], &["../proto"])?;
    Ok(())
}
