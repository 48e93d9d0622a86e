//! Regenerates `src/gen/` from `agent.proto` (`make generate`). Needs `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("src/gen");
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .out_dir(&out)
        .emit_rerun_if_changed(false)
        .compile_protos(&[root.join("agent.proto")], &[root.to_path_buf()])?;
    println!("wrote {}", out.display());
    Ok(())
}
