//! A client for exactly the cluster `$KUBECONFIG` names (never in-cluster config or
//! a default file), so tests cannot touch an unintended cluster.

use crate::E2eError;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::path::{Path, PathBuf};

/// The kubeconfig path from the `KUBECONFIG` value (first entry of a list).
pub fn kubeconfig_path(value: Option<&str>) -> Result<PathBuf, E2eError> {
    let first = value
        .and_then(|v| v.split(':').find(|p| !p.is_empty()))
        .ok_or(E2eError::KubeconfigUnset)?;
    Ok(PathBuf::from(first))
}

/// Client for the kubeconfig at `path`, using its current context.
pub async fn client_for(path: &Path) -> Result<Client, E2eError> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|source| E2eError::KubeconfigRead {
        path: path.to_path_buf(),
        source,
    })?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| E2eError::ClientConfig {
            path: path.to_path_buf(),
            source,
        })?;
    Client::try_from(config).map_err(E2eError::Client)
}

/// `cargo test` runs test binaries in the crate directory, so a relative
/// `KUBECONFIG=_out/kubeconfig` given at the workspace root is looked up there
/// too when it does not exist relative to the current directory.
pub fn resolve_relative(path: &Path, workspace_root: &Path) -> PathBuf {
    if path.is_absolute() || path.exists() {
        return path.to_path_buf();
    }
    let from_root = workspace_root.join(path);
    if from_root.exists() {
        from_root
    } else {
        path.to_path_buf()
    }
}

/// The kubeconfig file `$KUBECONFIG` names, resolved (see `resolve_relative`).
pub fn kubeconfig_from_env() -> Result<PathBuf, E2eError> {
    let value = std::env::var("KUBECONFIG").ok();
    let workspace_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Ok(resolve_relative(
        &kubeconfig_path(value.as_deref())?,
        &workspace_root,
    ))
}

/// Client for `$KUBECONFIG`.
pub async fn client_from_env() -> Result<Client, E2eError> {
    client_for(&kubeconfig_from_env()?).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_or_empty_kubeconfig_is_a_clear_error() {
        assert!(matches!(
            kubeconfig_path(None),
            Err(E2eError::KubeconfigUnset)
        ));
        assert!(matches!(
            kubeconfig_path(Some("")),
            Err(E2eError::KubeconfigUnset)
        ));
        assert!(matches!(
            kubeconfig_path(Some(":")),
            Err(E2eError::KubeconfigUnset)
        ));
    }

    #[test]
    fn first_entry_of_a_list_is_used() {
        let got = kubeconfig_path(Some(":/a/kc:/b/kc")).map_err(|e| e.to_string());
        assert_eq!(got, Ok(PathBuf::from("/a/kc")));
    }

    #[test]
    fn relative_path_falls_back_to_the_workspace_root() {
        let root = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(root) = root else {
            panic!("tempdir: {root:?}")
        };
        let rel = Path::new("hvx-kc-test/kubeconfig");
        assert_eq!(resolve_relative(rel, root.path()), rel.to_path_buf());
        std::fs::create_dir_all(root.path().join("hvx-kc-test")).ok();
        std::fs::write(root.path().join(rel), "x").ok();
        assert_eq!(resolve_relative(rel, root.path()), root.path().join(rel));
        let abs = Path::new("/abs/kc");
        assert_eq!(resolve_relative(abs, root.path()), abs.to_path_buf());
    }

    #[tokio::test]
    async fn missing_file_names_the_path() {
        let err = client_for(Path::new("/nonexistent/hvx/kubeconfig"))
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("/nonexistent/hvx/kubeconfig"), "{err}");
    }
}
