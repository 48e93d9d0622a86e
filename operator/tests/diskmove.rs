//! Cold disk moves across an operator restart, against a mocked API server and two
//! fake node agents serving the real gRPC contract on loopback (`common::agents`).
//!
//! The operator that starts a move is killed (its runtime dropped: every task and
//! connection of it ends, as when its pod dies) while the relay is half way. A new
//! operator, with nothing in memory, must resume from what the pod says
//! (`hvx.dev/disks-on`), move the disk again under the same move id (the pod's uid, which
//! makes ImportOverlay idempotent), record the outcome on the pod with its seal, and
//! never touch the old copy before the VM runs.

mod common;

use common::agents::{BASE_DIGEST, calls, fake_agents};
use common::{ApiHandle, Requests, agent_node, operator_context, serve, store_of};
use http::Method;
use hvx_api::launch::LaunchSpec;
use hvx_api::seal::{SealKey, Sealed, Subject};
use hvx_api::{OverlayDisk, VmApplication};
use hvx_operator::context::{Context, OperatorConfig};
use hvx_operator::hostplan::Cluster;
use hvx_operator::hostprep::DisksState;
use hvx_operator::stores::Stores;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

const POD_UID: &str = "p-db";

fn seal_key() -> SealKey {
    SealKey::new(b"diskmove-tests-key-0123456789abcdef")
}

fn launch_spec() -> LaunchSpec {
    serde_json::from_value(json!({
        "namespace": "prod", "application": "shop", "vmId": "u-1/db",
        "vm": {"name": "db", "memoryMib": 256,
               "disks": [{"name": "root", "overlayDisk": {"name": "db-root"}, "controller": "pvscsi", "unit": 0}]},
        "disks": [{"name": "root", "diskUid": "d-1"}],
        "nics": []
    }))
    .expect("launch spec")
}

/// The VM's launcher pod, bound to n2, whose disks its annotation says are on n1.
fn moving_pod() -> Pod {
    let spec = serde_json::to_string(&launch_spec()).expect("json");
    let mut pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "shop-db", "namespace": "prod", "uid": POD_UID, "resourceVersion": "1",
                     "labels": {"hvx.dev/app": "shop", "hvx.dev/vm": "db", "hvx.dev/role": "launcher"},
                     "annotations": {"hvx.dev/launch-spec": spec, "hvx.dev/disks-on": "n1"},
                     "ownerReferences": [{"apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
                                          "name": "shop", "uid": "u-1", "controller": true}]},
        "spec": {"nodeName": "n2", "containers": []}
    }))
    .expect("pod");
    seal_key().seal_pod(&mut pod, "u-1");
    pod
}

fn application() -> VmApplication {
    serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
        "metadata": {"name": "shop", "namespace": "prod", "uid": "u-1", "generation": 1},
        "spec": {"vms": [{"name": "db", "memoryMib": 256,
            "disks": [{"name": "root", "overlayDisk": {"name": "db-root"}, "controller": "pvscsi", "unit": 0}]}]}
    }))
    .expect("app")
}

fn disk() -> OverlayDisk {
    serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk",
        "metadata": {"name": "db-root", "namespace": "prod", "uid": "d-1", "generation": 1},
        "spec": {"source": {"http": {"url": "http://images.example/db.vmdk"}}}
    }))
    .expect("disk")
}

/// A freshly started operator's context: caches filled, nothing in memory.
fn operator(port: u16) -> (Arc<Context>, ApiHandle) {
    let mut config = OperatorConfig::default();
    config.agents.port = port;
    config.agents.timeout = Duration::from_secs(5);
    config.timings.disk_move_idle_seconds = 60;
    let stores = Stores::new(
        store_of(vec![
            agent_node("n1", "127.0.0.1", "True"),
            agent_node("n2", "127.0.0.2", "True"),
        ]),
        store_of(vec![moving_pod()]),
        store_of(vec![]),
        store_of(vec![]),
        store_of(vec![disk()]),
        store_of(vec![application()]),
        seal_key(),
    );
    operator_context(stores, config)
}

/// The API server: a pod patch answers the pod.
fn api_server(handle: ApiHandle) -> tokio::task::JoinHandle<Requests> {
    let mut pod = serde_json::to_value(moving_pod()).expect("json");
    pod["kind"] = json!("Pod");
    serve(handle, pod, vec![])
}

/// Runs passes of the disk step as the VmApplication controller would, until the disks
/// are ready on the pod's node or `deadline` passes.
async fn passes_until_ready(ctx: &Arc<Context>, deadline: Duration) -> Vec<DisksState> {
    let cluster = Cluster {
        node_ips: ctx.stores.agent_nodes(),
        node_labels: ctx.stores.agent_node_labels(),
    };
    let (app, pod, ls) = (application(), moving_pod(), launch_spec());
    let started = Instant::now();
    let mut states = Vec::new();
    while started.elapsed() < deadline {
        let state = hvx_operator::diskmove::prepare_disks(ctx, &app, &cluster, &pod, "n2", &ls)
            .await
            .expect("a pass of the disk step");
        let ready = state == DisksState::Ready;
        states.push(state);
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_move_cut_by_an_operator_restart_resumes_from_the_pod_and_keeps_the_old_copy() {
    let agents = fake_agents(vec![]).await;
    let port = agents.port;
    let moves = || agents.moves.lock().unwrap_or_else(|p| p.into_inner());

    // The first operator starts the move; it is killed with the relay half way (its
    // runtime, with every task and connection of it, is dropped).
    let first = tokio::runtime::Runtime::new().expect("runtime");
    first.spawn(async move {
        let (ctx, handle) = operator(port);
        let _api = api_server(handle);
        passes_until_ready(&ctx, Duration::from_secs(30)).await
    });
    let started = Instant::now();
    while moves().chunks_received == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the first operator never relayed a chunk: n1 {:?} n2 {:?}",
            calls(&agents.n1),
            calls(&agents.n2)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.shutdown_background();
    // The cut import ends on the new node, installing nothing.
    let started = Instant::now();
    while moves().imports.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new node's import did not end with the operator"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A new operator, nothing in memory: the pod still says the disks are on n1.
    let (ctx, handle) = operator(port);
    let api = api_server(handle);
    let states = passes_until_ready(&ctx, Duration::from_secs(30)).await;
    drop(ctx);
    let requests = api.await.expect("api server");
    let (n1, n2) = (calls(&agents.n1), calls(&agents.n2));

    assert_eq!(
        states.last(),
        Some(&DisksState::Ready),
        "the restarted operator finishes the move: {states:?} n1 {n1:?} n2 {n2:?}"
    );
    assert!(
        states
            .iter()
            .any(|s| matches!(s, DisksState::Waiting(w) if w.contains("moving"))),
        "progress says a move runs meanwhile: {states:?}"
    );
    // Both attempts carry the pod's uid as move id (idempotent on the target); only
    // the complete one installed anything, once.
    assert_eq!(
        moves().imports,
        vec![(POD_UID.to_string(), false), (POD_UID.to_string(), true)],
        "n2 {n2:?}"
    );
    assert_eq!(
        n1,
        vec!["ExportOverlay u-1/db root"; 2],
        "exported twice from the old node, nothing else asked of it"
    );
    // Then the overlay is ensured where the VM runs, and the old copy is kept (it is
    // deleted only once the VM runs there).
    assert!(
        n2.contains(&format!("EnsureOverlay u-1/db root {BASE_DIGEST}")),
        "{n2:?}"
    );
    assert!(
        !n2.iter().any(|c| c.starts_with("DeleteOverlay")),
        "nothing deleted before the VM runs: {n2:?}"
    );
    // The outcome is on the pod, sealed: disks-on gone, disks-moved-from n1.
    let patch = requests
        .iter()
        .find(|(m, p, _)| *m == Method::PATCH && p == "/api/v1/namespaces/prod/pods/shop-db")
        .unwrap_or_else(|| panic!("the pod records the move: {requests:?}"));
    let annotations = &patch.2["metadata"]["annotations"];
    assert_eq!(
        annotations["hvx.dev/disks-on"],
        Value::Null,
        "{annotations}"
    );
    assert_eq!(
        annotations["hvx.dev/disks-moved-from"], "n1",
        "{annotations}"
    );
    let seal = annotations[Sealed::DisksMovedFrom.seal_key()]
        .as_str()
        .unwrap_or_else(|| panic!("sealed: {annotations}"));
    let subject = Subject {
        namespace: "prod",
        pod: "shop-db",
        owner_uid: "u-1",
    };
    assert!(
        seal_key()
            .verify(&subject, Sealed::DisksMovedFrom, "n1", Some(seal))
            .is_ok(),
        "the seal verifies: {annotations}"
    );
    let events: Vec<&str> = requests
        .iter()
        .filter(|(m, p, _)| *m == Method::POST && p.contains("/events"))
        .filter_map(|(_, _, b)| b["reason"].as_str())
        .collect();
    assert!(
        events.contains(&"VmDisksMoving") && events.contains(&"VmDisksMoved"),
        "{events:?}"
    );
}
