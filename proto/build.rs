//! Generates the Export service and messages from `proto/` (needs `protoc`, Debian's
//! `protobuf-compiler`).

fn main() {
    if std::process::Command::new(std::env::var("PROTOC").unwrap_or_else(|_| "protoc".into()))
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "error: protoc was not found: install the Debian package `protobuf-compiler` (scripts/deps does)"
        );
        std::process::exit(1);
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/clustermesh/export/v1/export.proto"], &["proto"])
        .unwrap_or_else(|e| {
            eprintln!("error: compiling the Export protocol failed: {e}");
            std::process::exit(1);
        });
}
