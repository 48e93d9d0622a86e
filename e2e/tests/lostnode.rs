//! Cluster tier: a dead node blocks nothing. The operator runs in-process against the
//! real kube-apiserver (`make test-cluster`); a Node object with no kubelet behind it,
//! labelled `hvx.dev/agent=ready`, and its agent Lease last renewed long ago stand for
//! a node that died. Deleting a VirtualNetwork then completes: the removal owed to the
//! dead node is recorded (ConfigMap `hvx-owed-<node>` in the operator's namespace),
//! and deleting the Node drops the record.
//!
//! Short thresholds (5 s lease, 5 s grace) keep it quick; the operator still watches
//! for one whole window itself before it calls the node lost (it trusts no clock but
//! its own).

mod common;

use common::*;
use hvx_api::VirtualNetwork;
use hvx_operator::OperatorConfig;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use std::time::Duration;

const NODE: &str = "hvx-lostnode-test";
const WAIT: Duration = Duration::from_secs(120);

fn start_operator(client: &kube::Client, namespace: &str) -> tokio::task::JoinHandle<()> {
    let mut config = OperatorConfig {
        launcher_image: "hvx/launcher:dev".into(),
        image_pull_policy: "Never".into(),
        cpu_millis_per_vcpu: 10,
        require_agent_label: true,
        seal_key: Some(hvx_api::seal::SealKey::new(
            b"e2e-lostnode-test-seal-key-0123456789",
        )),
        namespace: namespace.into(),
        ..Default::default()
    };
    config.liveness.node_lease_seconds = 5;
    config.liveness.node_lost_grace_seconds = 5;
    // The dead node's address answers nothing: fail calls to it fast.
    config.agents.timeout = Duration::from_secs(3);
    tokio::spawn(hvx_operator::run::run(
        client.clone(),
        config,
        Some("e2e-lostnode".into()),
    ))
}

#[tokio::test]
async fn deleting_a_network_completes_with_a_dead_node_and_its_debt_goes_with_the_node() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "hvx-e2e-lostnode").await;
    let nodes: Api<Node> = Api::all(client.clone());
    let _ = nodes.delete(NODE, &DeleteParams::default()).await;
    wait_for("a previous run's node gone", WAIT, || async {
        nodes.get_opt(NODE).await.ok()?.is_none().then_some(())
    })
    .await;
    // A node that died: no kubelet (no status ever reported), an address nothing
    // answers on (TEST-NET-1), unschedulable and tainted so nothing lands there.
    let dead: Node = serde_json::from_value(json!({
        "metadata": {"name": NODE, "labels": {"hvx.dev/agent": "ready"}},
        "spec": {"unschedulable": true,
                 "taints": [{"key": "hvx.dev/lostnode-test", "effect": "NoSchedule"}]},
    }))
    .expect("node");
    nodes
        .create(&PostParams::default(), &dead)
        .await
        .expect("create node");
    nodes
        .patch_status(
            NODE,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {"addresses": [
                {"type": "InternalIP", "address": "192.0.2.10"}]}})),
        )
        .await
        .expect("node address");
    // Its agent's Lease, last renewed an hour ago.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let stale = k8s_openapi::jiff::Timestamp::now() - Duration::from_secs(3600);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": format!("hvx-agent-{NODE}"), "labels": {"hvx.dev/agent-lease": "true"}},
        "spec": {"holderIdentity": NODE, "leaseDurationSeconds": 5,
                 "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(stale)},
    }))
    .expect("lease");
    leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create lease");

    let operator = start_operator(&client, &ns);
    let nets: Api<VirtualNetwork> = Api::namespaced(client.clone(), &ns);
    apply(&client, &ns, &renamed(example("VirtualNetwork"), "front"))
        .await
        .expect("apply network");
    let net = wait_for("the network's VNI", WAIT, || async {
        nets.get_opt("front")
            .await
            .ok()?
            .filter(|n| n.status.as_ref().and_then(|s| s.vni).is_some())
    })
    .await;
    let uid = net.metadata.uid.clone().expect("uid");
    nets.delete("front", &DeleteParams::default())
        .await
        .expect("delete network");
    wait_for(
        "the network deleted despite the dead node",
        WAIT,
        || async { nets.get_opt("front").await.ok()?.is_none().then_some(()) },
    )
    .await;

    // What it owed the dead node is recorded, with the network's identity.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let record = cms
        .get(&format!("hvx-owed-{NODE}"))
        .await
        .expect("the owed-cleanup record");
    let entries = hvx_operator::owed::entries(&record);
    assert_eq!(entries.len(), 1, "{record:?}");
    let entry = entries[0].1.clone().expect("a readable entry");
    assert_eq!(entry.object_uid, uid);
    assert!(
        matches!(entry.call, hvx_operator::owed::OwedCall::DeleteNetwork { ref network_uid, .. } if *network_uid == uid),
        "{entry:?}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let deferred = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .any(|e| e.reason.as_deref() == Some("CleanupDeferred"));
    assert!(deferred, "a CleanupDeferred event on the network");

    // The Node is deleted: the record goes with it (nothing of hvx can run there).
    nodes
        .delete(NODE, &DeleteParams::default())
        .await
        .expect("delete node");
    wait_for("the record dropped with the node", WAIT, || async {
        cms.get_opt(&format!("hvx-owed-{NODE}"))
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;

    operator.abort();
    delete_namespace_and_wait(&client, &ns).await;
}
