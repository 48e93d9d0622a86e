//! Writes the CRD YAML for every hvx.dev kind into a directory (`make generate`).

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "crds".to_owned());
    for (file, crd) in hvx_api::all_crds() {
        let path = std::path::Path::new(&dir).join(file);
        let yaml = hvx_api::crd_yaml(&crd).with_context(|| format!("rendering {file}"))?;
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
