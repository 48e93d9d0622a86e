//! The committed CRD YAML must be exactly what the Rust types generate.

#[test]
fn committed_crd_yaml_matches_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stale = Vec::new();
    for (file, crd) in hvx_api::all_crds() {
        let want = hvx_api::crd_yaml(&crd).expect("render");
        let have = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        if have != want {
            stale.push(file);
        }
    }
    assert!(
        stale.is_empty(),
        "CRD YAML out of date: {stale:?}; run `make generate` and commit"
    );
}
