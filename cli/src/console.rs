//! `kubectl hvx console <vm>`: the VM's serial console, through `hvx-launcher console`
//! exec'd in its launcher pod. Ctrl-] detaches.

use crate::error::{CliError, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, AttachParams, ListParams};
use std::io::IsTerminal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Launcher container name.
pub const LAUNCHER_CONTAINER: &str = "launcher";
/// Ctrl-].
const DETACH: u8 = 0x1d;

/// The label selector for a VM's launcher pod: the labels the operator puts on it
/// (`hvx_api::labels`), never a migration's target pod.
pub fn selector(vm: &str, app: Option<&str>) -> String {
    match app {
        Some(app) => hvx_api::labels::vm_pod_selector(app, vm),
        None => hvx_api::labels::any_vm_pod_selector(vm),
    }
}

/// Puts the terminal in raw mode with `stty` (no unsafe termios calls) and restores
/// the saved mode on drop.
struct RawTerminal {
    saved: Option<String>,
}

impl RawTerminal {
    fn enter() -> Self {
        if !std::io::stdin().is_terminal() {
            return Self { saved: None };
        }
        let saved = std::process::Command::new("stty")
            .arg("-g")
            .stdin(std::process::Stdio::inherit())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        if saved.is_some() {
            let _ = std::process::Command::new("stty")
                .args(["raw", "-echo"])
                .stdin(std::process::Stdio::inherit())
                .status();
        }
        Self { saved }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = std::process::Command::new("stty")
                .arg(saved)
                .stdin(std::process::Stdio::inherit())
                .status();
        }
    }
}

/// Attaches to the console of `vm`.
pub async fn attach(client: &Client, namespace: &str, vm: &str, app: Option<&str>) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&selector(vm, app)))
        .await
        .map_err(|source| CliError::Kube {
            action: "cannot list launcher pods".into(),
            source,
        })?;
    let pod = list
        .items
        .iter()
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .and_then(|p| p.metadata.name.clone())
        .ok_or_else(|| {
            CliError::NotFound(format!(
                "no running launcher pod for VM {vm} in namespace {namespace}"
            ))
        })?;
    let params = AttachParams::interactive_tty().container(LAUNCHER_CONTAINER);
    let mut process = pods
        .exec(&pod, ["hvx-launcher", "console"], &params)
        .await
        .map_err(|source| CliError::Kube {
            action: format!("cannot attach to {pod}"),
            source,
        })?;
    let (Some(mut remote_in), Some(mut remote_out)) = (process.stdin(), process.stdout()) else {
        return Err(CliError::NotFound(
            "the exec session has no stdin/stdout".into(),
        ));
    };
    eprintln!("Connected to {vm} ({pod}). Detach with Ctrl-].\r");
    let _raw = RawTerminal::enter();
    let output = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        let _ = tokio::io::copy(&mut remote_out, &mut stdout).await;
    });
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        let n = match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(pos) = buf[..n].iter().position(|b| *b == DETACH) {
            let _ = remote_in.write_all(&buf[..pos]).await;
            break;
        }
        if remote_in.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    output.abort();
    process.abort();
    eprintln!("\r\nDetached from {vm}.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_the_labels_the_operator_puts_on_launcher_pods() {
        assert_eq!(
            selector("db", None),
            "hvx.dev/role=launcher,hvx.dev/vm=db,!hvx.dev/migration-target"
        );
        // The operator labels launcher pods `hvx.dev/app`, not the `hvx.dev/application`
        // the importer puts on the objects it writes (this selected no pod before).
        assert_eq!(
            selector("db", Some("shop")),
            "hvx.dev/role=launcher,hvx.dev/app=shop,hvx.dev/vm=db,!hvx.dev/migration-target"
        );
    }
}
