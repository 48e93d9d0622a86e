//! Writes the CRD YAML for every hvx.dev kind into each directory given
//! (`make generate` writes `crds/` and the Helm chart's copy).

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let mut dirs: Vec<String> = std::env::args().skip(1).collect();
    if dirs.is_empty() {
        dirs.push("crds".to_owned());
    }
    for dir in &dirs {
        for (file, crd) in hvx_api::all_crds() {
            let path = std::path::Path::new(dir).join(file);
            let yaml = hvx_api::crd_yaml(&crd).with_context(|| format!("rendering {file}"))?;
            std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
