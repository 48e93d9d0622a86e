//! The committed CRD YAML (and the Helm chart's copy) must be exactly what the Rust
//! types generate.

#[test]
fn committed_crd_yaml_matches_the_types() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stale = Vec::new();
    for dir in [root.to_path_buf(), root.join("../charts/hvx/files/crds")] {
        for (file, crd) in hvx_api::all_crds() {
            let want = hvx_api::crd_yaml(&crd).expect("render");
            let path = dir.join(file);
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            if have != want {
                stale.push(path.display().to_string());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "CRD YAML out of date: {stale:?}; run `make generate` and commit"
    );
}
