//! Regenerates `src/gen/` from the `.proto` files (`make generate`). Needs `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("src/gen");
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .out_dir(&out)
        .emit_rerun_if_changed(false)
        .compile_protos(
            &hvx_proto::PROTO_FILES.map(|f| root.join(f)),
            &[root.to_path_buf()],
        )?;
    println!("wrote {}", out.display());
    Ok(())
}
