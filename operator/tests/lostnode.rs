//! Lost nodes block nothing: finalizer cleanups against a mocked API server and two
//! fake node agents (plain gRPC on 127.0.0.1 for node n1 and 127.0.0.2 for node n2,
//! one port), each recording the calls it gets. n2 is made Lost or Suspect through
//! the operator's own observations (`ctx.node_seen`), as its clock would have them
//! after the node went silent.

mod common;

use common::agents::{Calls, FakeAgents, calls, fake_agents};
use common::{ApiHandle, Requests, agent_node, operator_context, serve, store_of};
use http::{Method, Request, Response};
use hvx_api::{OverlayDisk, VirtualNetwork, VmApplication};
use hvx_operator::context::{Context, OperatorConfig};
use hvx_operator::liveness::{self, Seen};
use hvx_operator::replay::{self, Outcome};
use hvx_operator::stores::Stores;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tower_test::mock::{self};

/// The agent Lease of `node`, renewed at `renewed` (the agent's clock).
fn lease(node: &str, renewed: &str) -> Lease {
    serde_json::from_value(json!({
        "metadata": {"name": format!("hvx-agent-{node}"), "namespace": "hvx-system",
                     "labels": {"hvx.dev/agent-lease": "true"}},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": 20, "renewTime": renewed}
    }))
    .expect("lease")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum N2 {
    /// Lease silent and Node Unknown for ten minutes.
    Lost,
    /// Lease silent for ten minutes, but the kubelet reports Ready.
    Suspect,
    /// Lost, and now renewing again (its renewTime moved since last seen).
    Back,
}

struct World {
    apps: Vec<VmApplication>,
    networks: Vec<VirtualNetwork>,
    disks: Vec<OverlayDisk>,
    n2: N2,
    port: u16,
}

fn context(w: World) -> (Arc<Context>, ApiHandle) {
    let n2_ready = if w.n2 == N2::Suspect {
        "True"
    } else {
        "Unknown"
    };
    let old = "2026-12-07T10:00:00.000000Z";
    let n2_lease = lease(
        "n2",
        if w.n2 == N2::Back {
            "2026-12-07T10:10:00.000000Z"
        } else {
            old
        },
    );
    let now = Timestamp::now();
    let long_ago = now - Duration::from_secs(600);
    let stores = Stores::new(
        store_of(vec![
            agent_node("n1", "127.0.0.1", "True"),
            agent_node("n2", "127.0.0.2", n2_ready),
        ]),
        store_of(vec![]),
        store_of(vec![]),
        store_of(w.networks),
        store_of(w.disks),
        store_of(w.apps),
        hvx_api::seal::SealKey::new(b"lostnode-tests-key-0123456789abcdef"),
    )
    .with_leases(store_of(vec![lease("n1", old), n2_lease]));
    let mut config = OperatorConfig::default();
    config.agents.port = w.port;
    config.agents.timeout = Duration::from_secs(3);
    let (ctx, handle) = operator_context(stores, config);
    // What this operator saw of n2 until now: its Lease last moved ten minutes ago
    // (and, unless its kubelet reports, its Node went unready then too).
    let (renew, _) = liveness::lease_renewal(&lease("n2", old));
    ctx.node_seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            "n2".into(),
            Seen {
                lease_renew: renew,
                has_lease: true,
                lease_changed_at: long_ago,
                heartbeat: liveness::node_ready(&agent_node("n2", "127.0.0.2", n2_ready)).1,
                node_down_since: (w.n2 != N2::Suspect).then_some(long_ago),
                announced: false,
            },
        );
    (ctx, handle)
}

// ---- API server -----------------------------------------------------------------

const RECORD_PATH: &str = "/api/v1/namespaces/hvx-system/configmaps/hvx-owed-n2";

/// The owed entries a pass recorded for n2 (merge patches of the record).
fn recorded(seen: &Requests) -> Vec<Value> {
    seen.iter()
        .filter(|(m, p, _)| *m == Method::PATCH && p == RECORD_PATH)
        .flat_map(|(_, _, b)| {
            b["data"]
                .as_object()
                .map(|d| d.values().cloned().collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .filter_map(|v| v.as_str().and_then(|s| serde_json::from_str(s).ok()))
        .collect()
}

fn events(seen: &Requests, reason: &str) -> usize {
    seen.iter()
        .filter(|(m, p, b)| *m == Method::POST && p.ends_with("/events") && b["reason"] == reason)
        .count()
}

fn finalizer_removed(seen: &Requests, path_end: &str) -> bool {
    seen.iter().any(|(m, p, b)| {
        *m == Method::PATCH && p.ends_with(path_end) && b.to_string().contains("remove")
    })
}

// ---- objects --------------------------------------------------------------------

fn deleting_meta(name: &str, uid: &str) -> Value {
    json!({"name": name, "namespace": "prod", "uid": uid, "resourceVersion": "7",
           "generation": 1, "finalizers": ["hvx.dev/cleanup"],
           "deletionTimestamp": "2026-12-07T10:20:00Z"})
}

fn network() -> VirtualNetwork {
    serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "VirtualNetwork",
        "metadata": deleting_meta("front", "net-1"),
        "spec": {"subnets": [{"name": "a", "cidr": "10.9.0.0/24"}]},
        "status": {"vni": 4097}
    }))
    .expect("network")
}

fn disk() -> OverlayDisk {
    serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk",
        "metadata": deleting_meta("db-root", "disk-1"),
        "spec": {"source": {"blank": {}}, "capacity": "1Gi"}
    }))
    .expect("disk")
}

fn app() -> VmApplication {
    serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
        "metadata": deleting_meta("shop", "u-1"),
        "spec": {"vms": [{
            "name": "db", "memoryMib": 256, "runStrategy": "Halted",
            "disks": [{"name": "root", "overlayDisk": {"name": "db-root"}, "controller": "pvscsi", "unit": 0}],
        }]}
    }))
    .expect("app")
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("the pass ends")
}

/// One pass of the network controller over the deleting network "front", with n1
/// alive and n2 as given: its result, the API requests and each agent's calls.
async fn network_deletion_pass(
    n2_state: N2,
) -> (
    Result<Action, hvx_operator::error::Error>,
    Requests,
    Calls,
    Calls,
) {
    let FakeAgents { port, n1, n2, .. } = fake_agents(vec![]).await;
    let net = network();
    let (ctx, handle) = context(World {
        apps: vec![],
        networks: vec![net.clone()],
        disks: vec![],
        n2: n2_state,
        port,
    });
    let server = serve(handle, serde_json::to_value(&net).expect("json"), vec![]);
    let action = within(hvx_operator::network::reconcile(Arc::new(net), ctx.clone())).await;
    drop(ctx);
    (action, server.await.expect("server"), n1, n2)
}

// ---- tests ----------------------------------------------------------------------

#[tokio::test]
async fn deleting_a_network_with_a_lost_node_records_its_share_and_completes() {
    let (action, seen, n1, n2) = network_deletion_pass(N2::Lost).await;
    let action = action.expect("cleanup with a lost node is done");
    assert_eq!(action, Action::await_change());
    assert_eq!(calls(&n1), vec!["DeleteNetwork net-1 4097"]);
    assert!(
        calls(&n2).is_empty(),
        "the lost node is not called: {:?}",
        calls(&n2)
    );
    let owed = recorded(&seen);
    assert_eq!(owed.len(), 1, "{seen:?}");
    assert_eq!(
        owed[0]["call"],
        json!({"call": "DeleteNetwork", "networkUid": "net-1", "vni": 4097})
    );
    assert_eq!(owed[0]["object"], "VirtualNetwork prod/front");
    assert_eq!(owed[0]["objectUid"], "net-1");
    assert!(
        finalizer_removed(&seen, "/virtualnetworks/front"),
        "{seen:?}"
    );
    assert_eq!(events(&seen, "CleanupDeferred"), 1, "{seen:?}");
    assert_eq!(events(&seen, "NodeLost"), 1, "{seen:?}");
}

#[tokio::test]
async fn a_suspect_node_makes_the_cleanup_wait_without_an_error_or_a_record() {
    let (action, seen, n1, n2) = network_deletion_pass(N2::Suspect).await;
    let action = action.expect("waiting is not an error");
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert!(seen.is_empty(), "no record, no finalizer change: {seen:?}");
    assert!(calls(&n1).is_empty() && calls(&n2).is_empty());
}

#[tokio::test]
async fn deleting_a_disk_with_a_lost_node_records_the_release() {
    let FakeAgents { port, n1, n2, .. } = fake_agents(vec![]).await;
    let d = disk();
    let (ctx, handle) = context(World {
        apps: vec![],
        networks: vec![],
        disks: vec![d.clone()],
        n2: N2::Lost,
        port,
    });
    let server = serve(handle, serde_json::to_value(&d).expect("json"), vec![]);
    within(hvx_operator::disk::reconcile(Arc::new(d), ctx.clone()))
        .await
        .expect("done");
    drop(ctx);
    let seen = server.await.expect("server");
    assert_eq!(calls(&n1), vec!["ReleaseDisk disk-1"]);
    assert!(calls(&n2).is_empty());
    let owed = recorded(&seen);
    assert_eq!(
        owed.iter().map(|o| o["call"].clone()).collect::<Vec<_>>(),
        vec![json!({"call": "ReleaseDisk", "diskUid": "disk-1"})]
    );
    assert!(
        finalizer_removed(&seen, "/overlaydisks/db-root"),
        "{seen:?}"
    );
    assert_eq!(events(&seen, "CleanupDeferred"), 1);
}

#[tokio::test]
async fn deleting_an_application_with_a_lost_node_records_its_overlays() {
    let FakeAgents { port, n1, n2, .. } = fake_agents(vec![]).await;
    let a = app();
    let (ctx, handle) = context(World {
        apps: vec![a.clone()],
        networks: vec![],
        disks: vec![],
        n2: N2::Lost,
        port,
    });
    let server = serve(handle, serde_json::to_value(&a).expect("json"), vec![]);
    within(hvx_operator::vmapp::reconcile(Arc::new(a), ctx.clone()))
        .await
        .expect("done");
    drop(ctx);
    let seen = server.await.expect("server");
    assert_eq!(calls(&n1), vec!["DeleteOverlay u-1/db root"]);
    assert!(calls(&n2).is_empty());
    assert_eq!(
        recorded(&seen)
            .iter()
            .map(|o| o["call"].clone())
            .collect::<Vec<_>>(),
        vec![json!({"call": "DeleteOverlay", "vmUid": "u-1/db", "diskName": "root"})]
    );
    assert!(finalizer_removed(&seen, "/vmapplications/shop"), "{seen:?}");
}

/// The record of n2 as the API server holds it.
fn record_of_n2(entries: &[Value]) -> ConfigMap {
    let data: serde_json::Map<String, Value> = entries
        .iter()
        .map(|e| {
            let entry: hvx_operator::owed::OwedEntry =
                serde_json::from_value(e.clone()).expect("entry");
            (entry.key(), Value::String(e.to_string()))
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": "hvx-owed-n2", "namespace": "hvx-system", "resourceVersion": "41",
                     "labels": {"hvx.dev/owed-cleanup": "true"},
                     "annotations": {"hvx.dev/node": "n2"}},
        "data": data,
    }))
    .expect("configmap")
}

fn owed_entries() -> Vec<Value> {
    vec![
        json!({"call": {"call": "DeleteNetwork", "networkUid": "net-1", "vni": 4097},
               "object": "VirtualNetwork prod/front", "objectUid": "net-1", "recordedAt": "x"}),
        // Held by a newer network on that node now: never deleted by VNI.
        json!({"call": {"call": "DeleteNetwork", "networkUid": "net-old", "vni": 4100},
               "object": "VirtualNetwork prod/old", "objectUid": "net-old", "recordedAt": "x"}),
        json!({"call": {"call": "ReleaseDisk", "diskUid": "disk-1"},
               "object": "OverlayDisk prod/db-root", "objectUid": "disk-1", "recordedAt": "x"}),
        json!({"call": {"call": "DeleteOverlay", "vmUid": "u-1/db", "diskName": "root"},
               "object": "VmApplication prod/shop", "objectUid": "u-1", "recordedAt": "x"}),
    ]
}

async fn replay_round(n2: N2, record: ConfigMap) -> (BTreeOutcomes, Requests, Calls, String) {
    let FakeAgents {
        port, n2: n2_calls, ..
    } = fake_agents(vec![("net-1".into(), 4097), ("net-new".into(), 4100)]).await;
    let (ctx, handle) = context(World {
        apps: vec![],
        networks: vec![],
        disks: vec![],
        n2,
        port,
    });
    let list = json!({"metadata": {}, "items": [record]});
    let server = serve(
        handle,
        json!({"kind": "None"}),
        vec![("/api/v1/namespaces/hvx-system/configmaps", list)],
    );
    let outcomes = within(replay::round(&ctx)).await.expect("round");
    let metrics = ctx.metrics.render();
    drop(ctx);
    (outcomes, server.await.expect("server"), n2_calls, metrics)
}

type BTreeOutcomes = std::collections::BTreeMap<String, Outcome>;

#[tokio::test]
async fn a_returning_node_gets_its_owed_work_replayed_then_the_record_deleted() {
    let (outcomes, seen, n2, metrics) = replay_round(N2::Back, record_of_n2(&owed_entries())).await;
    assert_eq!(outcomes.get("n2"), Some(&Outcome::Replayed(4)), "{seen:?}");
    let got = calls(&n2);
    assert!(
        got.contains(&"DeleteNetwork net-1 4097".to_string()),
        "{got:?}"
    );
    assert!(
        !got.iter().any(|c| c.contains("4100")),
        "a VNI another network holds now is left alone: {got:?}"
    );
    assert!(got.contains(&"ReleaseDisk disk-1".to_string()), "{got:?}");
    assert!(
        got.contains(&"DeleteOverlay u-1/db root".to_string()),
        "{got:?}"
    );
    // Replayed first, then the record deleted as it was read (resourceVersion).
    let deletes: Vec<&(Method, String, Value)> = seen
        .iter()
        .filter(|(m, p, _)| *m == Method::DELETE && p == RECORD_PATH)
        .collect();
    assert_eq!(deletes.len(), 1, "{seen:?}");
    assert_eq!(deletes[0].2["preconditions"]["resourceVersion"], "41");
    assert!(
        !metrics.contains("hvx_operator_owed_cleanup_entries{node=\"n2\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_lost_or_suspect_node_keeps_its_record_untouched() {
    for state in [N2::Lost, N2::Suspect] {
        let (outcomes, seen, n2, metrics) =
            replay_round(state, record_of_n2(&owed_entries())).await;
        assert_eq!(outcomes.get("n2"), Some(&Outcome::Kept(4)), "{state:?}");
        assert!(calls(&n2).is_empty(), "{state:?}: {:?}", calls(&n2));
        assert!(
            !seen
                .iter()
                .any(|(m, _, _)| *m == Method::DELETE || *m == Method::PATCH),
            "{state:?}: {seen:?}"
        );
        assert!(
            metrics.contains("hvx_operator_owed_cleanup_entries{node=\"n2\"} 4"),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn a_deleted_node_has_its_record_dropped_without_any_call() {
    let mut record = record_of_n2(&owed_entries());
    record.metadata.name = Some("hvx-owed-n3".into());
    record
        .metadata
        .annotations
        .get_or_insert_default()
        .insert("hvx.dev/node".into(), "n3".into());
    let (outcomes, seen, n2, _) = replay_round(N2::Back, record).await;
    assert_eq!(outcomes.get("n3"), Some(&Outcome::Dropped(4)), "{seen:?}");
    assert!(calls(&n2).is_empty());
    // The API server confirmed the Node is gone before the record went.
    let confirm = seen
        .iter()
        .position(|(m, p, _)| *m == Method::GET && p == "/api/v1/nodes")
        .unwrap_or_else(|| panic!("the Node is looked up: {seen:?}"));
    let delete = seen
        .iter()
        .position(|(m, p, _)| {
            *m == Method::DELETE && p == "/api/v1/namespaces/hvx-system/configmaps/hvx-owed-n3"
        })
        .unwrap_or_else(|| panic!("the record is deleted: {seen:?}"));
    assert!(confirm < delete);
}

#[tokio::test]
async fn uninstall_drops_the_records_no_operator_will_replay() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let list = json!({"metadata": {}, "items": [record_of_n2(&owed_entries())]});
    let server = serve(
        handle,
        json!({"kind": "None"}),
        vec![("/api/v1/namespaces/hvx-system/configmaps", list)],
    );
    let dropped = within(hvx_operator::uninstall::drop_owed(&client, "hvx-system"))
        .await
        .expect("dropped");
    drop(client);
    let seen = server.await.expect("server");
    assert_eq!(dropped, 4);
    let (list_req, delete_req) = (&seen[0], &seen[1]);
    assert_eq!(list_req.0, Method::GET);
    assert_eq!(list_req.1, "/api/v1/namespaces/hvx-system/configmaps");
    assert_eq!(
        (&delete_req.0, delete_req.1.as_str()),
        (&Method::DELETE, RECORD_PATH)
    );
    assert_eq!(seen.len(), 2, "{seen:?}");
}
