//! The committed generated code must be what the `.proto` files generate today.

#[test]
fn committed_grpc_code_matches_the_proto() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().expect("tempdir");
    tonic_prost_build::configure()
        .out_dir(tmp.path())
        .emit_rerun_if_changed(false)
        .compile_protos(
            &hvx_proto::PROTO_FILES.map(|f| root.join(f)),
            &[root.to_path_buf()],
        )
        .expect("protoc must be installed (hack/install-deps.sh)");
    for file in [
        "hvx.agent.v1.rs",
        "csi.v1.rs",
        "pluginregistration.rs",
        "v1beta1.rs",
    ] {
        let want = std::fs::read_to_string(tmp.path().join(file)).expect("generated");
        let have = std::fs::read_to_string(root.join("src/gen").join(file)).unwrap_or_default();
        assert!(
            have == want,
            "src/gen/{file} is stale: run `make generate` and commit"
        );
    }
}
