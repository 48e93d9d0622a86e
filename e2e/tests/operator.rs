//! Cluster tier: the operator's controllers, run in-process against the real
//! kube-apiserver and scheduler of `make cluster-up`. Checks VNI allocation, disk
//! status, dependency-ordered launcher pods, validation conditions and events, restart
//! of the operator mid-way (level-triggered recovery) and finalizer cleanup.

mod common;

use common::*;
use hvx_api::{DiskPhase, OverlayDisk, VirtualNetwork, VmApplication, VmPhase};
use hvx_operator::OperatorConfig;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn start_operator(client: &kube::Client) -> tokio::task::JoinHandle<()> {
    let config = OperatorConfig {
        launcher_image: "hvx/launcher:dev".into(),
        image_pull_policy: "Never".into(),
        cpu_millis_per_vcpu: 10,
        // Nodes here have no agent yet: launcher pods must stay unschedulable, which
        // is what lets this test observe dependency ordering deterministically.
        require_agent_label: true,
        agents: Default::default(),
        // One key across the restart below, as the chart's Secret is.
        seal_key: Some(hvx_api::seal::SealKey::new(
            b"e2e-operator-test-seal-key-0123456789",
        )),
        ..Default::default()
    };
    tokio::spawn(hvx_operator::run::run(
        client.clone(),
        config,
        Some("e2e".into()),
    ))
}

async fn vm_status(apps: &Api<VmApplication>, app: &str, vm: &str) -> Option<hvx_api::VmStatus> {
    apps.get_opt(app)
        .await
        .ok()??
        .status?
        .vms
        .into_iter()
        .find(|v| v.name == vm)
}

#[tokio::test]
async fn operator_runs_applications_in_dependency_order_and_cleans_up() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "hvx-e2e-operator").await;
    let apps: Api<VmApplication> = Api::namespaced(client.clone(), &ns);
    let nets: Api<VirtualNetwork> = Api::namespaced(client.clone(), &ns);
    let disks: Api<OverlayDisk> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let operator = start_operator(&client);

    // The application first: its references do not exist yet.
    apply(&client, &ns, &example("VmApplication"))
        .await
        .expect("apply app");
    let db = wait_for("db waiting for its disk", WAIT, || async {
        vm_status(&apps, "shop", "db")
            .await
            .filter(|s| s.reason.as_deref() == Some("waiting for OverlayDisk db-root"))
    })
    .await;
    assert_eq!(db.phase, VmPhase::Pending);
    let web = vm_status(&apps, "shop", "web").await.expect("web status");
    assert_eq!(web.reason.as_deref(), Some("waiting for db to be running"));
    assert!(
        pods.list(&ListParams::default())
            .await
            .expect("pods")
            .items
            .is_empty(),
        "no pod before references resolve"
    );

    // Network and disks arrive: VNI allocated, disks pending import, db's pod created.
    for obj in examples()
        .into_iter()
        .filter(|o| o["kind"] != "VmApplication")
    {
        apply(&client, &ns, &obj).await.expect("apply");
    }
    let vni = wait_for("VNI allocated", WAIT, || async {
        nets.get("app-net").await.ok()?.status?.vni
    })
    .await;
    assert!(
        (4096..1 << 24).contains(&vni),
        "VNI {vni} out of hvx's range"
    );
    wait_for("disk status", WAIT, || async {
        (disks.get("db-root").await.ok()?.status?.phase == Some(DiskPhase::Pending)).then_some(())
    })
    .await;
    let db_pod = wait_for("db launcher pod", WAIT, || async {
        pods.get_opt("shop-db").await.ok()?
    })
    .await;
    let launch: hvx_api::launch::LaunchSpec = serde_json::from_str(
        db_pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("hvx.dev/launch-spec"))
            .expect("launch spec annotation"),
    )
    .expect("launch spec parses");
    assert_eq!(launch.nics[0].vni, vni);
    assert_eq!(launch.vm.nics[0].mac_address, "00:50:56:a1:00:02");

    // The scheduler keeps it Pending (no node runs an agent), so web must not start.
    let db = wait_for("db scheduling", WAIT, || async {
        vm_status(&apps, "shop", "db").await.filter(|s| {
            s.phase == VmPhase::Scheduling
                && s.reason.as_deref().is_some_and(|r| r.contains("node"))
        })
    })
    .await;
    assert!(
        db.reason.unwrap_or_default().contains("node"),
        "scheduler's reason is surfaced"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        pods.get_opt("shop-web").await.expect("get").is_none(),
        "web started before db was running"
    );

    // Operator killed mid-way; the pod it made disappears meanwhile; a new operator
    // converges again from cluster state alone.
    operator.abort();
    let _ = operator.await;
    pods.delete("shop-db", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete pod");
    wait_for("pod gone", WAIT, || async {
        pods.get_opt("shop-db").await.ok()?.is_none().then_some(())
    })
    .await;
    let operator = start_operator(&client);
    wait_for("db pod recreated", WAIT, || async {
        pods.get_opt("shop-db").await.ok()?
    })
    .await;
    let app = apps.get("shop").await.expect("app");
    let status = app.status.expect("status");
    assert_eq!(status.vm_count, 2);
    assert_eq!(status.running_count, 0);

    // An application the schema accepts but that cannot run: the same MAC on two VMs.
    let mut bad = renamed(example("VmApplication"), "dup-mac");
    bad["spec"]["vms"][1]["nics"][0]["macAddress"] = json!("00:50:56:a1:00:02");
    apply(&client, &ns, &bad).await.expect("schema accepts it");
    let invalid = wait_for("Valid=False", WAIT, || async {
        let st = apps.get("dup-mac").await.ok()?.status?;
        st.conditions
            .into_iter()
            .find(|c| c.type_ == "Valid" && c.status == "False")
    })
    .await;
    assert!(
        invalid
            .message
            .contains("MAC 00:50:56:a1:00:02 is already used by spec.vms[db].nics[ethernet0]"),
        "{}",
        invalid.message
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    wait_for("InvalidSpec event", WAIT, || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("InvalidSpec"))
    })
    .await;
    assert!(
        pods.get_opt("dup-mac-db").await.expect("get").is_none(),
        "no pod for an invalid application"
    );

    // Deletion: the finalizer holds until the launcher pods are gone.
    apps.delete("shop", &DeleteParams::default())
        .await
        .expect("delete app");
    apps.delete("dup-mac", &DeleteParams::default())
        .await
        .expect("delete app");
    wait_for("applications gone", Duration::from_secs(120), || async {
        (apps
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty())
        .then_some(())
    })
    .await;
    assert!(
        pods.list(&ListParams::default())
            .await
            .expect("pods")
            .items
            .is_empty(),
        "launcher pods left behind"
    );

    // Networks and disks the applications used go once the applications are gone
    // (their finalizers clear while the operator runs, so the namespace can go too).
    for n in nets.list(&ListParams::default()).await.expect("nets").items {
        nets.delete(&n.name_any(), &DeleteParams::default())
            .await
            .expect("delete network");
    }
    for d in disks
        .list(&ListParams::default())
        .await
        .expect("disks")
        .items
    {
        disks
            .delete(&d.name_any(), &DeleteParams::default())
            .await
            .expect("delete disk");
    }
    wait_for(
        "networks and disks gone",
        Duration::from_secs(60),
        || async {
            let n = nets.list(&ListParams::default()).await.ok()?.items.len();
            let d = disks.list(&ListParams::default()).await.ok()?.items.len();
            (n + d == 0).then_some(())
        },
    )
    .await;

    operator.abort();
    delete_namespace(&client, &ns).await;
}
