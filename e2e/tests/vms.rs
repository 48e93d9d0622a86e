//! VMs for real on the local cluster, with hvx installed by `helm install` (the
//! Makefile's `e2e` target installs it, and serves the sample disk with
//! `hack/samples-server.sh`): the examples/ two-VM application imports its disks on
//! the nodes, boots both VMs under TCG on different nodes, they get DHCP addresses and
//! reach each other over the overlay; killing the operator and one agent leaves the
//! VMs running; deleting the application leaves nothing on any node.
//!
//! The guests are driven through their serial consoles, whose sockets the launcher
//! keeps in the node's run dir (this host, for the local cluster).

mod common;

use common::*;
use hvx_api::VmApplication;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const NS: &str = "hvx-e2e-vms";
const RUN_ROOT: &str = "/run/hvx";
const STORE_ROOT: &str = "/var/lib/hvx";

/// Polls like `wait_for`, but dumps the application's state before failing.
async fn wait_or_dump<T, F, Fut>(client: &Client, what: &str, timeout: Duration, mut check: F) -> T
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
            dump(client).await;
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn dump(client: &Client) {
    let apps: Api<VmApplication> = Api::namespaced(client.clone(), NS);
    if let Ok(app) = apps.get("shop").await {
        eprintln!(
            "--- VmApplication status:\n{}",
            serde_json::to_string_pretty(&app.status).unwrap_or_default()
        );
    }
    for kind in ["OverlayDisk", "VirtualNetwork"] {
        if let Ok(list) = api_for(client, NS, kind).list(&ListParams::default()).await {
            for o in list.items {
                eprintln!(
                    "--- {kind} {}: {}",
                    o.metadata.name.unwrap_or_default(),
                    o.data.get("status").cloned().unwrap_or_default()
                );
            }
        }
    }
    for ns in [NS, "hvx-system"] {
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

fn shop_status(app: &VmApplication) -> Value {
    serde_json::to_value(&app.status).unwrap_or_default()
}

/// (node, ip) of each VM once the application is Running and every NIC has an address.
async fn running_with_addresses(client: &Client) -> Vec<(String, String, String)> {
    let apps: Api<VmApplication> = Api::namespaced(client.clone(), NS);
    wait_or_dump(
        client,
        "both VMs Running with DHCP addresses",
        Duration::from_secs(900),
        || {
            let apps = apps.clone();
            async move {
                let s = shop_status(&apps.get("shop").await.ok()?);
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

fn vm_run_dir(node: &str, app_uid: &str, vm: &str) -> PathBuf {
    hvx_api::node::NodePaths::new(Path::new(STORE_ROOT), Path::new(RUN_ROOT), node)
        .vm_run_dir(&format!("{app_uid}/{vm}"))
}

/// Runs `cmd` in the guest's root shell on its serial console; true iff it exited 0.
/// Busybox's line editor asks the terminal for the cursor position (`ESC[6n`) at each
/// prompt and would eat typed input as the answer, so we answer like a terminal and
/// type only after the prompt.
async fn guest_run(run_dir: &Path, cmd: &str, timeout: Duration) -> (bool, String) {
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

/// web fetches db's page (its hostname) over the overlay.
async fn assert_web_reaches_db(web_dir: &Path, when: &str) {
    let (ok, out) = guest_run(
        web_dir,
        "wget -q -O - http://10.77.0.20/",
        Duration::from_secs(60),
    )
    .await;
    assert!(
        ok && out.contains("\ndb"),
        "web -> db over HTTP {when}:\n{out}"
    );
}

fn netns_exec(node: &str, argv: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", node])
        .args(argv)
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn guest_boot_id(run_dir: &Path) -> Option<String> {
    let log = std::fs::read_to_string(run_dir.join("serial.log")).ok()?;
    log.lines()
        .rev()
        .find_map(|l| l.split("HVX-GUEST boot-id=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_string)
}

#[tokio::test]
async fn two_vm_application_boots_talks_and_cleans_up() {
    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let agent_nodes = wait_or_dump(
        &client,
        "hvx agents ready on every node",
        Duration::from_secs(300),
        || {
            let nodes = nodes.clone();
            async move {
                let all = nodes.list(&ListParams::default()).await.ok()?.items;
                let ready = nodes
                    .list(&ListParams::default().labels("hvx.dev/agent=ready"))
                    .await
                    .ok()?
                    .items;
                (ready.len() == all.len() && ready.len() >= 2).then_some(ready.len())
            }
        },
    )
    .await;
    eprintln!("{agent_nodes} agent nodes ready");

    fresh_namespace(&client, NS).await;
    for obj in examples() {
        apply(&client, NS, &obj)
            .await
            .unwrap_or_else(|e| panic!("applying {}: {e}", obj["metadata"]["name"]));
    }
    let apps: Api<VmApplication> = Api::namespaced(client.clone(), NS);
    let app_uid = apps
        .get("shop")
        .await
        .expect("app")
        .metadata
        .uid
        .expect("uid");

    // Kill the operator while the application starts: it must pick up where it was.
    let operator_pods: Api<Pod> = Api::namespaced(client.clone(), "hvx-system");
    let ops = operator_pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
        .expect("operator pods");
    assert!(
        !ops.items.is_empty(),
        "no operator pod in hvx-system: is hvx installed?"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    for p in ops.items {
        let name = p.metadata.name.unwrap_or_default();
        eprintln!("killing operator pod {name} mid-start");
        let _ = operator_pods
            .delete(
                &name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
            )
            .await;
    }

    let vms = running_with_addresses(&client).await;
    eprintln!("running: {vms:?}");
    let find = |n: &str| {
        vms.iter()
            .find(|v| v.0 == n)
            .cloned()
            .expect("vm in status")
    };
    let (db, web) = (find("db"), find("web"));
    assert_ne!(
        db.1, web.1,
        "anti-affinity puts web and db on different nodes"
    );
    assert_eq!(db.2, "10.77.0.20", "db has its DHCP reservation");
    assert!(
        web.2.starts_with("10.77.0."),
        "web got a DHCP address: {}",
        web.2
    );

    let web_dir = vm_run_dir(&web.1, &app_uid, "web");
    let db_dir = vm_run_dir(&db.1, &app_uid, "db");
    // Across nodes, over the overlay: web -> db by HTTP (db's httpd answers its
    // hostname) and db -> web by ping.
    assert_web_reaches_db(&web_dir, "failed").await;
    let (ok, out) = guest_run(
        &db_dir,
        &format!("ping -c 3 -W 3 {}", web.2),
        Duration::from_secs(60),
    )
    .await;
    assert!(ok, "db -> web ping failed:\n{out}");

    // Kill the agent of web's node: the VM keeps running (same QEMU, same boot).
    let boot_before = guest_boot_id(&web_dir).expect("web boot id in serial log");
    let launcher_uid = |pods: Vec<Pod>| {
        pods.into_iter()
            .find(|p| p.metadata.name.as_deref() == Some("shop-web"))
            .and_then(|p| p.metadata.uid)
    };
    let vm_pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let web_pod_before = launcher_uid(
        vm_pods
            .list(&ListParams::default())
            .await
            .expect("pods")
            .items,
    );
    let agents = operator_pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await
        .expect("agent pods");
    let web_agent = agents
        .items
        .iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(web.1.as_str()))
        .and_then(|p| p.metadata.name.clone())
        .expect("agent pod on web's node");
    eprintln!("killing agent pod {web_agent}");
    operator_pods
        .delete(&web_agent, &DeleteParams::default())
        .await
        .expect("delete agent pod");
    wait_or_dump(
        &client,
        "agent pod replaced and ready",
        Duration::from_secs(180),
        || {
            let operator_pods = operator_pods.clone();
            let (old, node) = (web_agent.clone(), web.1.clone());
            async move {
                let list = operator_pods
                    .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
                    .await
                    .ok()?;
                list.items
                    .iter()
                    .any(|p| {
                        p.metadata.name.as_deref() != Some(old.as_str())
                            && p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                                == Some(node.as_str())
                            && p.status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|c| {
                                    c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                                })
                    })
                    .then_some(())
            }
        },
    )
    .await;
    assert_web_reaches_db(&web_dir, "after the agent restart").await;
    assert_eq!(
        guest_boot_id(&web_dir).as_deref(),
        Some(boot_before.as_str()),
        "web did not reboot"
    );
    assert_eq!(
        launcher_uid(
            vm_pods
                .list(&ListParams::default())
                .await
                .expect("pods")
                .items
        ),
        web_pod_before,
        "web's launcher pod is the same one"
    );

    // Delete everything the example created; nothing may stay on any node.
    let _ = apps.delete("shop", &DeleteParams::default()).await;
    for kind in ["OverlayDisk", "VirtualNetwork"] {
        let api = api_for(&client, NS, kind);
        for o in api.list(&ListParams::default()).await.expect("list").items {
            let _ = api
                .delete(
                    &o.metadata.name.unwrap_or_default(),
                    &DeleteParams::default(),
                )
                .await;
        }
    }
    wait_or_dump(
        &client,
        "application, disks and network deleted",
        Duration::from_secs(300),
        || {
            let client = client.clone();
            async move {
                for kind in ["VmApplication", "OverlayDisk", "VirtualNetwork"] {
                    if !api_for(&client, NS, kind)
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
    for (_, node, _) in &vms {
        let links = netns_exec(node, &["ip", "-o", "link", "show"]);
        for prefix in ["hvt", "hvb", "hvv"] {
            assert!(
                !links
                    .lines()
                    .any(|l| l.split(": ").nth(1).is_some_and(|n| n.starts_with(prefix))),
                "{prefix}* link left on {node}:\n{links}"
            );
        }
        let paths = hvx_api::node::NodePaths::new(Path::new(STORE_ROOT), Path::new(RUN_ROOT), node);
        let leftover = |dir: PathBuf| -> Vec<String> {
            std::fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path().display().to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(
            leftover(paths.disk_store().join("disks")),
            Vec::<String>::new(),
            "overlays left on {node}"
        );
        assert_eq!(
            leftover(paths.disk_store().join("bases")),
            Vec::<String>::new(),
            "bases left on {node}"
        );
        assert_eq!(
            leftover(paths.vms_dir()),
            Vec::<String>::new(),
            "VM run dirs left on {node}"
        );
    }
    delete_namespace(&client, NS).await;
}
