//! The command-line tools tests drive (kubectl), found without guessing the
//! cluster: `KUBECTL`, the harness's pinned build, or `kubectl` on PATH.

use crate::E2eError;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Kubernetes version the local harness builds (e2e/harness/versions.env).
pub const HARNESS_K8S_VERSION: &str = "v1.34.4";

/// Candidate kubectl paths, best first.
pub fn kubectl_candidates(kubectl_env: Option<&str>, hvx_cache: Option<&str>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(k) = kubectl_env.filter(|k| !k.is_empty()) {
        out.push(PathBuf::from(k));
    }
    let cache = hvx_cache
        .filter(|c| !c.is_empty())
        .unwrap_or("/var/cache/hvx");
    out.push(
        Path::new(cache)
            .join("k8s")
            .join(HARNESS_K8S_VERSION)
            .join("bin/kubectl"),
    );
    out
}

pub fn find_kubectl() -> Result<PathBuf, E2eError> {
    let env = std::env::var("KUBECTL").ok();
    let cache = std::env::var("HVX_CACHE").ok();
    if let Some(found) = kubectl_candidates(env.as_deref(), cache.as_deref())
        .into_iter()
        .find(|p| p.is_file())
    {
        return Ok(found);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("kubectl"))
                .find(|p| p.is_file())
        })
        .ok_or(E2eError::NoKubectl)
}

/// Arguments of `kubectl drain` for a node running plain (unmanaged) pods.
pub fn drain_args(node: &str, timeout_secs: u64) -> Vec<String> {
    vec![
        "drain".to_string(),
        node.to_string(),
        "--ignore-daemonsets".to_string(),
        "--delete-emptydir-data".to_string(),
        // Plain pods have no controller to re-create them: kubectl wants --force.
        "--force".to_string(),
        "--grace-period=5".to_string(),
        format!("--timeout={timeout_secs}s"),
    ]
}

/// Runs kubectl with `args` against `kubeconfig` and returns stdout.
pub fn run_kubectl(kubeconfig: &Path, args: &[String]) -> Result<String, E2eError> {
    let kubectl = find_kubectl()?;
    let command = format!("{} {}", kubectl.display(), args.join(" "));
    let output = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .map_err(|source| E2eError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(E2eError::CommandFailed {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_env_comes_first_then_the_harness_cache() {
        let c = kubectl_candidates(Some("/x/kubectl"), Some("/c"));
        assert_eq!(c[0], PathBuf::from("/x/kubectl"));
        assert_eq!(c[1], PathBuf::from("/c/k8s/v1.34.4/bin/kubectl"));
        let d = kubectl_candidates(Some(""), None);
        assert_eq!(
            d,
            vec![PathBuf::from("/var/cache/hvx/k8s/v1.34.4/bin/kubectl")]
        );
    }

    #[test]
    fn drain_forces_plain_pods_and_bounds_time() {
        let a = drain_args("n1", 120);
        assert_eq!(a[..2], ["drain".to_string(), "n1".to_string()]);
        assert!(a.contains(&"--force".to_string()));
        assert!(a.contains(&"--timeout=120s".to_string()));
    }
}
