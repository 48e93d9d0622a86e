//! Helpers of the tests that drive VMs on the local cluster: waiting with a state
//! dump on failure, the guests' serial consoles, node network namespaces.

use super::api_for;
use hvx_api::VmApplication;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Where the nodes of the local cluster keep run dirs and disks (this host).
pub const RUN_ROOT: &str = "/run/hvx";
/// The nodes' persistent hvx root.
pub const STORE_ROOT: &str = "/var/lib/hvx";

/// Polls like `wait_for`, but dumps the application's state before failing.
pub async fn wait_or_dump<T, F, Fut>(
    client: &Client,
    ns: &str,
    what: &str,
    timeout: Duration,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            dump(client, ns).await;
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Prints the application, disks, networks and pods (with log tails) of `ns`.
pub async fn dump(client: &Client, ns: &str) {
    let apps: Api<VmApplication> = Api::namespaced(client.clone(), ns);
    if let Ok(app) = apps.get("shop").await {
        eprintln!(
            "--- VmApplication status:\n{}",
            serde_json::to_string_pretty(&app.status).unwrap_or_default()
        );
    }
    for kind in ["OverlayDisk", "VirtualNetwork"] {
        if let Ok(list) = api_for(client, ns, kind).list(&ListParams::default()).await {
            for o in list.items {
                eprintln!(
                    "--- {kind} {}: {}",
                    o.metadata.name.unwrap_or_default(),
                    o.data.get("status").cloned().unwrap_or_default()
                );
            }
        }
    }
    for ns in [ns, "hvx-system"] {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        if let Ok(list) = pods.list(&ListParams::default()).await {
            for p in list.items {
                let name = p.metadata.name.clone().unwrap_or_default();
                let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
                eprintln!("--- pod {ns}/{name} {phase:?} on {node:?}");
                let logs = pods
                    .logs(
                        &name,
                        &kube::api::LogParams {
                            tail_lines: Some(25),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap_or_default();
                eprintln!("{logs}");
            }
        }
    }
}

/// (node, ip) of each VM once the application is Running and every NIC has an address.
pub async fn running_with_addresses(client: &Client, ns: &str) -> Vec<(String, String, String)> {
    let apps: Api<VmApplication> = Api::namespaced(client.clone(), ns);
    wait_or_dump(
        client,
        ns,
        "both VMs Running with DHCP addresses",
        Duration::from_secs(900),
        || {
            let apps = apps.clone();
            async move {
                let s = serde_json::to_value(&apps.get("shop").await.ok()?.status).ok()?;
                if s["phase"] != "Running" {
                    return None;
                }
                let vms = s["vms"].as_array()?;
                vms.iter()
                    .map(|v| {
                        Some((
                            v["name"].as_str()?.to_string(),
                            v["node"].as_str()?.to_string(),
                            v["interfaces"][0]["ipAddress"].as_str()?.to_string(),
                        ))
                    })
                    .collect::<Option<Vec<_>>>()
            }
        },
    )
    .await
}

/// A VM's run dir on a node of the local cluster.
pub fn vm_run_dir(node: &str, app_uid: &str, vm: &str) -> PathBuf {
    hvx_api::node::NodePaths::new(Path::new(STORE_ROOT), Path::new(RUN_ROOT), node)
        .vm_run_dir(&format!("{app_uid}/{vm}"))
}

/// Runs `cmd` in the guest's root shell on its serial console; true iff it exited 0.
/// Busybox's line editor asks the terminal for the cursor position (`ESC[6n`) at each
/// prompt and would eat typed input as the answer, so we answer like a terminal and
/// type only after the prompt.
pub async fn guest_run(run_dir: &Path, cmd: &str, timeout: Duration) -> (bool, String) {
    let sock = run_dir.join("serial.sock");
    let mut stream = match UnixStream::connect(&sock).await {
        Ok(s) => s,
        Err(e) => return (false, format!("connecting {}: {e}", sock.display())),
    };
    let marker = format!("E2E{}", std::process::id());
    let mut out = String::new();
    let mut answered = 0;
    let mut typed = false;
    if let Err(e) = stream.write_all(b"\n").await {
        return (false, format!("writing to the console: {e}"));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => out.push_str(&String::from_utf8_lossy(&buf[..n])),
            Ok(Err(e)) => return (false, format!("{out}\nreading the console: {e}")),
            Err(_) => {}
        }
        let queries = out.matches("\x1b[6n").count();
        while answered < queries {
            let _ = stream.write_all(b"\x1b[24;1R").await;
            answered += 1;
        }
        if !typed && out.contains("hvx# ") {
            // Let the prompt's cursor query be answered first.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let line = format!("{cmd}; echo {marker}-$?-END\n");
            if let Err(e) = stream.write_all(line.as_bytes()).await {
                return (false, format!("writing to the console: {e}"));
            }
            typed = true;
        }
        if out.contains(&format!("{marker}-0-END")) {
            return (true, out);
        }
        // The echo of the typed line shows `-$?-`: only a digit is an exit code.
        let failed = out.match_indices(&format!("{marker}-")).any(|(i, m)| {
            let rest = &out[i + m.len()..];
            rest.starts_with(|c: char| c.is_ascii_digit()) && rest.contains("-END")
        });
        if failed {
            return (false, out);
        }
    }
    (false, format!("{out}\n(no result within {timeout:?})"))
}

/// Runs a command in a node's network namespace; its stdout.
pub fn netns_exec(node: &str, argv: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", node])
        .args(argv)
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The boot id the guest printed last on its serial log.
pub fn guest_boot_id(run_dir: &Path) -> Option<String> {
    let log = std::fs::read_to_string(run_dir.join("serial.log")).ok()?;
    log.lines()
        .rev()
        .find_map(|l| l.split("HVX-GUEST boot-id=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_string)
}

/// Deletes every hvx object in `ns` (migrations, applications, disks, networks) and
/// waits until the finalizers let them go.
pub async fn delete_all_hvx_objects(client: &Client, ns: &str) {
    const KINDS: [&str; 4] = [
        "VmMigration",
        "VmApplication",
        "OverlayDisk",
        "VirtualNetwork",
    ];
    for kind in KINDS {
        let api = api_for(client, ns, kind);
        for o in api.list(&ListParams::default()).await.expect("list").items {
            let _ = api
                .delete(
                    &o.metadata.name.unwrap_or_default(),
                    &kube::api::DeleteParams::default(),
                )
                .await;
        }
    }
    wait_or_dump(
        client,
        ns,
        "every hvx object deleted",
        Duration::from_secs(300),
        || {
            let client = client.clone();
            async move {
                for kind in KINDS {
                    if !api_for(&client, ns, kind)
                        .list(&ListParams::default())
                        .await
                        .ok()?
                        .items
                        .is_empty()
                    {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
}

/// A fresh `ns` with the examples/ application applied; the application's UID.
pub async fn apply_examples(client: &Client, ns: &str) -> String {
    super::fresh_namespace(client, ns).await;
    for obj in super::examples() {
        super::apply(client, ns, &obj)
            .await
            .unwrap_or_else(|e| panic!("applying {}: {e}", obj["metadata"]["name"]));
    }
    let apps: Api<VmApplication> = Api::namespaced(client.clone(), ns);
    apps.get("shop")
        .await
        .expect("app")
        .metadata
        .uid
        .expect("uid")
}
