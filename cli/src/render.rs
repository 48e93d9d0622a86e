//! Manifests as YAML: one multi-document stream, or one file per object.

use crate::error::{CliError, Result};
use crate::manifests::Manifests;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One rendered object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    /// File name when written to a directory (`vmapplication-shop.yaml`).
    pub file_name: String,
    /// YAML text, without the `---` separator.
    pub yaml: String,
}

fn doc<T: Serialize>(kind: &str, name: &str, object: &T) -> Result<Document> {
    let yaml = serde_yaml::to_string(object).map_err(|source| CliError::Render {
        what: format!("{kind} {name}"),
        source,
    })?;
    Ok(Document {
        file_name: format!("{}-{name}.yaml", kind.to_ascii_lowercase()),
        yaml,
    })
}

/// Networks first, then disks, then the application: the order `kubectl apply` wants.
pub fn documents(m: &Manifests) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    for n in &m.networks {
        docs.push(doc(
            "VirtualNetwork",
            n.metadata.name.as_deref().unwrap_or(""),
            n,
        )?);
    }
    for d in &m.disks {
        docs.push(doc(
            "OverlayDisk",
            d.metadata.name.as_deref().unwrap_or(""),
            d,
        )?);
    }
    let app_name = m.app.metadata.name.as_deref().unwrap_or("");
    let mut app = doc("VmApplication", app_name, &m.app)?;
    // Warnings travel with the manifest, so a reviewer of the YAML sees them too.
    let header: String = m
        .warnings
        .iter()
        .map(|w| format!("# warning: {}\n", w.replace('\n', " ")))
        .collect();
    app.yaml = format!("{header}{}", app.yaml);
    docs.push(app);
    Ok(docs)
}

/// All documents as one `---`-separated stream.
pub fn stream(docs: &[Document]) -> String {
    docs.iter().map(|d| format!("---\n{}", d.yaml)).collect()
}

/// Writes one file per document into `dir` (created when missing). Returns the paths.
pub fn write_dir(docs: &[Document], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|source| CliError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    docs.iter()
        .map(|d| {
            let path = dir.join(&d.file_name);
            std::fs::write(&path, &d.yaml).map_err(|source| CliError::Write {
                path: path.clone(),
                source,
            })?;
            Ok(path)
        })
        .collect()
}
