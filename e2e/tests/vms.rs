//! VMs for real on the local cluster, with hvx installed by `helm install` (the
//! Makefile's `e2e` target installs it, and serves the sample disk with
//! `hack/samples-server.sh`): the examples/ two-VM application imports its disks on
//! the nodes, boots both VMs under TCG on different nodes, they get DHCP addresses and
//! reach each other over the overlay; killing the operator and one agent leaves the
//! VMs running; a user of another namespace with only `edit` there cannot touch them
//! (`tenancy/attacks.rs`); deleting the application leaves nothing on any node.
//!
//! The guests are driven through their serial consoles, whose sockets the launcher
//! keeps in the node's run dir (this host, for the local cluster).

#[path = "tenancy/attacks.rs"]
mod attacks;
mod common;

use common::guest::*;
use common::*;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams};
use std::path::{Path, PathBuf};
use std::time::Duration;

const NS: &str = "hvx-e2e-vms";

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

#[tokio::test]
async fn two_vm_application_boots_talks_and_cleans_up() {
    let client = client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let agent_nodes = wait_or_dump(
        &client,
        NS,
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

    let app_uid = apply_examples(&client, NS).await;

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

    let vms = running_with_addresses(&client, NS).await;
    eprintln!("running: {vms:?}");
    // Their launcher pods mount nothing of the node but what the agent's CSI driver
    // gave them (the VM's own directories).
    let launchers = Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels("hvx.dev/role=launcher"))
        .await
        .expect("launcher pods");
    assert!(!launchers.items.is_empty(), "no launcher pods in {NS}");
    for p in &launchers.items {
        let spec = p.spec.clone().unwrap_or_default();
        for v in spec.volumes.iter().flatten() {
            assert!(
                v.host_path.is_none(),
                "launcher pod {:?} mounts hostPath {:?}",
                p.metadata.name,
                v.host_path
            );
        }
        let csi = spec
            .volumes
            .iter()
            .flatten()
            .filter(|v| v.csi.as_ref().is_some_and(|c| c.driver == "vm.hvx.dev"))
            .count();
        assert_eq!(
            csi, 2,
            "launcher pod {:?} has its two vm.hvx.dev volumes",
            p.metadata.name
        );
        // /dev/kvm comes from the agent's device plugin: one devices.hvx.dev/kvm
        // unit, which the scheduler found on the pod's node (the pod runs).
        let resources = spec.containers[0].resources.clone().unwrap_or_default();
        for (what, list) in [
            ("requests", resources.requests),
            ("limits", resources.limits),
        ] {
            assert_eq!(
                list.unwrap_or_default()
                    .get("devices.hvx.dev/kvm")
                    .map(|q| q.0.clone()),
                Some("1".to_string()),
                "launcher pod {:?} {what} one devices.hvx.dev/kvm",
                p.metadata.name
            );
        }
        let node_name = spec.node_name.clone().expect("scheduled");
        let node = Api::<Node>::all(client.clone())
            .get(&node_name)
            .await
            .expect("node");
        let allocatable = node
            .status
            .and_then(|s| s.allocatable)
            .unwrap_or_default()
            .get("devices.hvx.dev/kvm")
            .map(|q| q.0.clone());
        assert_eq!(
            allocatable.as_deref(),
            Some("110"),
            "node {node_name} advertises the agent's devices.hvx.dev/kvm units"
        );
    }
    // They run in a namespace that enforces Pod Security `baseline` (the admission
    // plugin would have refused them otherwise), and nothing in them is privileged.
    let ns = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .get(NS)
        .await
        .expect("namespace");
    assert_eq!(
        ns.metadata
            .labels
            .unwrap_or_default()
            .get(PSA_ENFORCE)
            .map(String::as_str),
        Some("baseline"),
        "{NS} enforces Pod Security baseline"
    );
    for p in &launchers.items {
        let spec = p.spec.clone().unwrap_or_default();
        assert!(
            spec.host_network != Some(true)
                && spec.host_pid != Some(true)
                && spec.host_ipc != Some(true),
            "launcher pod {:?} uses a host namespace",
            p.metadata.name
        );
        let sc = spec.containers[0]
            .security_context
            .clone()
            .unwrap_or_default();
        assert_eq!(
            sc.privileged,
            Some(false),
            "launcher pod {:?}",
            p.metadata.name
        );
        assert_eq!(
            sc.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()]),
            "launcher pod {:?} drops every capability",
            p.metadata.name
        );
    }
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

    // Another namespace's user with `edit` there attacks db; nothing may change.
    attacks::attacks_from_another_namespace_fail(
        &client,
        &attacks::Victim {
            ns: NS.into(),
            app_uid: app_uid.clone(),
            vm: "db".into(),
            node: db.1.clone(),
            nic: "ethernet0".into(),
            disks: vec!["root".into()],
        },
    )
    .await;
    assert_web_reaches_db(&web_dir, "after the attacks").await;

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
        NS,
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
    delete_all_hvx_objects(&client, NS).await;
    for (_, node, _) in &vms {
        let links = netns_exec(node, &["ip", "-o", "link", "show"]);
        // Taps, bridges, VXLAN devices, and the node ends of the networks' gateway
        // and transit veths (they go with the gateway namespaces).
        for prefix in ["hvt", "hvb", "hvv", "hvg", "hvu"] {
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
