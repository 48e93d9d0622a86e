//! VmApplication reconciles against a mocked API server (tower-test): what a pass asks
//! of the API server, request by request. Reads come from the shared caches, which the
//! tests fill directly, so any request not scripted here (a list, a get) stalls the
//! pass and fails the test by its deadline.

mod common;

use common::{ApiHandle, agent_node, operator_context, respond, serve, serve_refusing, store_of};
use http::{Method, Request, Response};
use hvx_api::{VirtualNetwork, VmApplication};
use hvx_operator::context::{Context, OperatorConfig};
use hvx_operator::stores::Stores;
use k8s_openapi::api::core::v1::Pod;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// The key the tests' operator seals launcher pods with.
fn seal_key() -> hvx_api::seal::SealKey {
    hvx_api::seal::SealKey::new(b"reconcile-tests-key-0123456789abcdef")
}

/// A launcher pod of VM `vm` of application shop (uid u-1) as hvx makes it, sealed.
fn launcher_pod(vm: &str) -> Pod {
    let spec = json!({"namespace": "prod", "application": "shop", "vmId": format!("u-1/{vm}")});
    let mut pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("shop-{vm}"), "namespace": "prod", "uid": format!("p-{vm}"),
                     "resourceVersion": "1",
                     "labels": {"hvx.dev/app": "shop", "hvx.dev/vm": vm, "hvx.dev/role": "launcher"},
                     "annotations": {"hvx.dev/launch-spec": spec.to_string()},
                     "ownerReferences": [{"apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
                                          "name": "shop", "uid": "u-1", "controller": true}]},
        "spec": {"containers": []}
    }))
    .expect("pod");
    seal_key().seal_pod(&mut pod, "u-1");
    pod
}

fn context(apps: Vec<VmApplication>, pods: Vec<Pod>) -> (Arc<Context>, ApiHandle) {
    context_with_networks(apps, pods, vec![])
}

fn context_with_networks(
    apps: Vec<VmApplication>,
    pods: Vec<Pod>,
    networks: Vec<VirtualNetwork>,
) -> (Arc<Context>, ApiHandle) {
    context_with_nodes(apps, pods, networks, vec![], OperatorConfig::default())
}

fn context_with_nodes(
    apps: Vec<VmApplication>,
    pods: Vec<Pod>,
    networks: Vec<VirtualNetwork>,
    nodes: Vec<k8s_openapi::api::core::v1::Node>,
    config: OperatorConfig,
) -> (Arc<Context>, ApiHandle) {
    let stores = Stores::new(
        store_of(nodes),
        store_of(pods),
        store_of(vec![]),
        store_of(networks),
        store_of(vec![]),
        store_of(apps),
        seal_key(),
    );
    operator_context(stores, config)
}

fn app(finalized: bool, deleting: bool) -> VmApplication {
    let mut meta = json!({"name": "shop", "namespace": "prod", "uid": "u-1",
                          "resourceVersion": "7", "generation": 1});
    if finalized {
        meta["finalizers"] = json!(["hvx.dev/cleanup"]);
    }
    if deleting {
        meta["deletionTimestamp"] = json!("2026-12-04T10:00:00Z");
    }
    serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication", "metadata": meta,
        "spec": {"vms": [{
            "name": "db", "memoryMib": 256, "runStrategy": "Halted",
            "disks": [{"name": "root", "overlayDisk": {"name": "db-root"}, "controller": "pvscsi", "unit": 0}],
        }]}
    }))
    .expect("app")
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.expect("body");
    serde_json::from_slice(&bytes).expect("json body")
}

/// The next request the pass makes, within a deadline.
async fn next(
    handle: &mut ApiHandle,
) -> (
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("the pass made no further request")
        .expect("service dropped")
}

/// Whether `req` is the finalizer's JSON patch (tested against the cached finalizers
/// and uid, no resourceVersion) and not the status write.
async fn is_finalizer_patch(req: Request<Body>, cached: Value) -> Result<(), Value> {
    let path = req.uri().path().to_string();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = body_json(req).await;
    if path == "/apis/hvx.dev/v1alpha1/namespaces/prod/vmapplications/shop"
        && content_type == "application/json-patch+json"
        && body
            == json!([
                {"op": "test", "path": "/metadata/uid", "value": "u-1"},
                {"op": "test", "path": "/metadata/finalizers", "value": cached},
                {"op": "add", "path": "/metadata/finalizers", "value": ["hvx.dev/cleanup"]},
            ])
    {
        Ok(())
    } else {
        Err(body)
    }
}

#[tokio::test]
async fn a_new_application_gets_its_first_status_then_its_finalizer_without_waiting_for_a_watch() {
    let obj = app(false, false);
    let (ctx, mut handle) = context(vec![obj.clone()], vec![]);
    let pass = tokio::spawn(hvx_operator::vmapp::reconcile(
        Arc::new(obj.clone()),
        ctx.clone(),
    ));
    let mut with_finalizer = serde_json::to_value(app(true, false)).expect("json");
    with_finalizer["metadata"]["resourceVersion"] = json!("8");

    // The status first, then the finalizer (a JSON patch with tests, so the status
    // just written cannot fail it): no watch round trip between them, no GET, no list.
    let (status_req, status_send) = next(&mut handle).await;
    assert_eq!(status_req.method(), Method::PATCH);
    assert_eq!(
        status_req.uri().path(),
        "/apis/hvx.dev/v1alpha1/namespaces/prod/vmapplications/shop/status"
    );
    assert!(
        status_req
            .uri()
            .query()
            .unwrap_or_default()
            .contains("fieldManager=hvx-operator")
    );
    let status = body_json(status_req).await["status"].clone();
    assert_eq!(status["phase"], "Stopped", "{status}");
    assert_eq!(status["vms"][0]["phase"], "Stopped", "{status}");
    assert_eq!(status["observedGeneration"], 1);
    respond(status_send, &with_finalizer);
    let (fin_req, fin_send) = next(&mut handle).await;
    is_finalizer_patch(fin_req, Value::Null)
        .await
        .expect("finalizer patch");
    respond(fin_send, &with_finalizer);

    let action = tokio::time::timeout(Duration::from_secs(5), pass)
        .await
        .expect("pass ends")
        .expect("task")
        .expect("reconciled");
    // Halted and stopped: nothing to poll for.
    assert_eq!(action, Action::requeue(hvx_operator::status::RESYNC_IDLE));

    // The next pass (the finalizer's watch event) finds nothing to write.
    let again = tokio::time::timeout(
        Duration::from_secs(5),
        hvx_operator::vmapp::reconcile(Arc::new(app(true, false)), ctx.clone()),
    )
    .await
    .expect("a pass with nothing to write makes no request")
    .expect("reconciled");
    assert_eq!(again, Action::requeue(hvx_operator::status::RESYNC_IDLE));
}

#[tokio::test]
async fn an_application_that_lost_its_finalizer_gets_it_back_before_anything_else() {
    // Not new (it has a status): its pass may act on nodes, which only the finalizer's
    // cleanup undoes, so the finalizer comes first and the pass waits for it.
    let mut obj = app(false, false);
    obj.metadata.finalizers = Some(vec!["example.com/keep".into()]);
    obj.status = serde_json::from_value(json!({"phase": "Stopped"})).expect("status");
    let (ctx, mut handle) = context(vec![obj.clone()], vec![]);
    let pass = tokio::spawn(hvx_operator::vmapp::reconcile(
        Arc::new(obj.clone()),
        ctx.clone(),
    ));
    let (req, send) = next(&mut handle).await;
    let body = body_json(req).await;
    assert_eq!(
        body,
        json!([
            {"op": "test", "path": "/metadata/uid", "value": "u-1"},
            {"op": "test", "path": "/metadata/finalizers", "value": ["example.com/keep"]},
            {"op": "add", "path": "/metadata/finalizers/-", "value": "hvx.dev/cleanup"},
        ])
    );
    // Nothing else is asked before the finalizer is answered.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), handle.next_request())
            .await
            .is_err(),
        "a request went out before the finalizer landed"
    );
    // The cache was stale (the test failed: 422): looked at again soon, no error.
    send.send_response(
        Response::builder()
            .status(422)
            .body(Body::from(
                serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "testing value /metadata/finalizers failed", "reason": "Invalid", "code": 422}))
                .expect("json"),
            ))
            .expect("response"),
    );
    let action = tokio::time::timeout(Duration::from_secs(5), pass)
        .await
        .expect("pass ends")
        .expect("task")
        .expect("a stale cache is not an error");
    assert_eq!(action, Action::requeue(Duration::from_millis(500)));
}

#[tokio::test]
async fn deleting_waits_for_launcher_pods_without_an_error_or_removing_the_finalizer() {
    let obj = app(true, true);
    let pod = launcher_pod("db");
    // A pod someone else made with the application's labels: neither waited for nor
    // deleted.
    let mut forged = pod.clone();
    forged.metadata.name = Some("shop-db-forged".into());
    forged.metadata.uid = Some("p-forged".into());
    let (ctx, mut handle) = context(vec![obj.clone()], vec![pod.clone()]);
    let pass = tokio::spawn(hvx_operator::vmapp::reconcile(Arc::new(obj), ctx.clone()));

    // Cleanup asks the API server itself (the cache could be behind a pod's creation).
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().path(), "/api/v1/namespaces/prod/pods");
    assert!(
        req.uri()
            .query()
            .unwrap_or_default()
            .contains("labelSelector=hvx.dev%2Fapp%3Dshop"),
        "{:?}",
        req.uri()
    );
    respond(
        send,
        &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [forged, pod]}),
    );
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::DELETE);
    assert_eq!(req.uri().path(), "/api/v1/namespaces/prod/pods/shop-db");
    respond(send, &serde_json::to_value(&pod).expect("json"));

    let action = tokio::time::timeout(Duration::from_secs(5), pass)
        .await
        .expect("pass ends")
        .expect("task")
        .expect("waiting is not an error");
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    // No finalizer patch followed.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), handle.next_request())
            .await
            .is_err(),
        "the finalizer must stay while pods terminate"
    );
}

#[tokio::test]
async fn a_vm_starts_only_once_what_it_depends_on_runs() {
    let obj: VmApplication = serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
        "metadata": {"name": "shop", "namespace": "prod", "uid": "u-1", "resourceVersion": "7",
                     "generation": 1, "finalizers": ["hvx.dev/cleanup"]},
        "spec": {"vms": [
            {"name": "web", "memoryMib": 256, "dependsOn": ["db"]},
            {"name": "db", "memoryMib": 256},
        ]}
    }))
    .expect("app");
    let (ctx, handle) = context(vec![obj.clone()], vec![]);
    let server = serve(handle, serde_json::to_value(&obj).expect("json"), vec![]);
    let action = tokio::time::timeout(
        Duration::from_secs(10),
        hvx_operator::vmapp::reconcile(Arc::new(obj.clone()), ctx.clone()),
    )
    .await
    .expect("pass ends")
    .expect("reconciled");
    drop(ctx);
    let seen = server.await.expect("server");
    let paths: Vec<String> = seen.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    // db's pod (and its disruption budget) is created, sealed; web's is not. A
    // create, not an apply: an apply would adopt a pod of that name someone else made.
    let created = seen
        .iter()
        .find(|(m, p, _)| *m == Method::POST && p == "/api/v1/namespaces/prod/pods")
        .map(|(_, _, b)| b.clone())
        .unwrap_or_else(|| panic!("no pod created: {paths:#?}"));
    assert_eq!(created["metadata"]["name"], "shop-db");
    let created: Pod = serde_json::from_value(created).expect("pod");
    assert_eq!(
        hvx_api::seal::check_pod(&seal_key(), &created, Some("u-1")),
        Ok(()),
        "the pod the operator made passes its own check"
    );
    assert!(
        paths.contains(
            &"PATCH /apis/policy/v1/namespaces/prod/poddisruptionbudgets/shop-db".to_string()
        ),
        "{paths:#?}"
    );
    assert!(
        !paths.iter().any(|p| p.contains("pods/shop-web")),
        "{paths:#?}"
    );
    // No list and no get in the pass.
    assert!(!seen.iter().any(|(m, _, _)| m == Method::GET), "{paths:#?}");
    let status = seen
        .iter()
        .rev()
        .find(|(_, p, _)| p.ends_with("/vmapplications/shop/status"))
        .map(|(_, _, b)| b["status"].clone())
        .expect("status written");
    let vm = |name: &str| {
        status["vms"]
            .as_array()
            .and_then(|v| v.iter().find(|x| x["name"] == name))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(vm("db")["phase"], "Scheduling", "{status}");
    assert_eq!(vm("web")["phase"], "Pending", "{status}");
    assert_eq!(
        vm("web")["reason"],
        "waiting for db to be running",
        "{status}"
    );
    // Status keeps the spec's order.
    assert_eq!(status["vms"][0]["name"], "web");
    // A VM on its way is looked at again soon.
    assert_eq!(action, Action::requeue(hvx_operator::status::RESYNC_BUSY));
}

fn network(name: &str, uid: &str, created: &str, vni: Option<u32>) -> VirtualNetwork {
    serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "VirtualNetwork",
        "metadata": {"name": name, "namespace": "prod", "uid": uid, "resourceVersion": "3",
                     "generation": 1, "creationTimestamp": created,
                     "finalizers": ["hvx.dev/cleanup"]},
        "spec": {"subnets": [{"name": "s", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"}]},
        "status": {"vni": vni},
    }))
    .expect("network")
}

#[tokio::test]
async fn the_later_of_two_networks_sharing_a_vni_gets_a_new_one() {
    let first = network("a", "uid-a", "2026-12-01T00:00:00Z", Some(5000));
    let second = network("b", "uid-b", "2026-12-02T00:00:00Z", Some(5000));
    let (ctx, mut handle) =
        context_with_networks(vec![], vec![], vec![first.clone(), second.clone()]);

    // The earlier network keeps its VNI: its pass writes status without allocating.
    let pass = tokio::spawn(hvx_operator::network::reconcile(
        Arc::new(first.clone()),
        ctx.clone(),
    ));
    let (req, send) = next(&mut handle).await;
    assert_eq!(
        req.method(),
        Method::PATCH,
        "no list for a network that keeps its VNI"
    );
    let body = body_json(req).await;
    assert_eq!(body["status"]["vni"], 5000, "{body}");
    respond(send, &serde_json::to_value(&first).expect("json"));
    tokio::time::timeout(Duration::from_secs(5), pass)
        .await
        .expect("pass ends")
        .expect("task")
        .expect("reconciled");

    // The later one allocates again, from a fresh list (never from the cache: a
    // collision would join two tenants' networks).
    let pass = tokio::spawn(hvx_operator::network::reconcile(
        Arc::new(second.clone()),
        ctx.clone(),
    ));
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().path(), "/apis/hvx.dev/v1alpha1/virtualnetworks");
    respond(
        send,
        &json!({"apiVersion": "hvx.dev/v1alpha1", "kind": "VirtualNetworkList", "metadata": {},
                "items": [first, second]}),
    );
    let (req, send) = next(&mut handle).await;
    assert_eq!(req.method(), Method::PATCH);
    assert!(req.uri().path().ends_with("/virtualnetworks/b/status"));
    let body = body_json(req).await;
    let vni = body["status"]["vni"].as_u64().expect("a VNI");
    assert_ne!(vni, 5000, "{body}");
    assert!(
        (u64::from(hvx_operator::network::VNI_MIN)..=u64::from(hvx_operator::network::VNI_MAX))
            .contains(&vni)
    );
    respond(send, &serde_json::to_value(&second).expect("json"));
    tokio::time::timeout(Duration::from_secs(5), pass)
        .await
        .expect("pass ends")
        .expect("task")
        .expect("reconciled");
}

/// A VmMigration of VM db in prod (`status` may be null).
fn migration(app: &str, status: Value) -> hvx_api::migration::VmMigration {
    serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "VmMigration",
        "metadata": {"name": "m1", "namespace": "prod", "uid": "m-uid", "resourceVersion": "2",
                     "generation": 1, "finalizers": ["hvx.dev/cleanup"]},
        "spec": {"application": app, "vm": "db"},
        "status": status,
    }))
    .expect("migration")
}

/// One migration pass against the permissive server: the requests it made, and how
/// many progress records are left afterwards.
async fn migration_pass(
    ctx: Arc<Context>,
    handle: ApiHandle,
    mig: hvx_api::migration::VmMigration,
) -> (Vec<(Method, String, Value)>, usize) {
    let server = serve(handle, serde_json::to_value(&mig).expect("json"), vec![]);
    tokio::time::timeout(
        Duration::from_secs(10),
        hvx_operator::migration::reconcile(Arc::new(mig), ctx.clone()),
    )
    .await
    .expect("pass ends")
    .expect("reconciled");
    let followed = ctx.migrations_followed.lock().expect("lock").len();
    // The server ends when the last client (in the context) is gone.
    drop(ctx);
    (server.await.expect("server"), followed)
}

#[tokio::test]
async fn a_migration_of_a_missing_application_fails_with_its_reason_and_rolls_nothing_back() {
    let (ctx, handle) = context(vec![], vec![]);
    let (seen, _) = migration_pass(ctx, handle, migration("gone", Value::Null)).await;
    let status = seen
        .iter()
        .find(|(m, p, _)| m == Method::PATCH && p.ends_with("/vmmigrations/m1/status"))
        .map(|(_, _, b)| b["status"].clone())
        .expect("status written");
    assert_eq!(status["phase"], "Failed", "{status}");
    assert!(
        status["failureReason"]
            .as_str()
            .is_some_and(|r| r.contains("VmApplication gone does not exist")),
        "{status}"
    );
    // The phase history records the one legal step (none -> Failed).
    assert_eq!(status["phaseTimestamps"][0]["phase"], "Failed", "{status}");
    // Nothing was deleted: there was nothing to roll back.
    assert!(
        !seen.iter().any(|(m, _, _)| m == Method::DELETE),
        "{:?}",
        seen.iter()
            .map(|(m, p, _)| format!("{m} {p}"))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn the_reconcile_writes_what_a_migrations_progress_task_heard() {
    let mig = migration(
        "shop",
        json!({"phase": "PreCopy", "sourceNode": "n1", "targetNode": "n2",
               "phaseTimestamps": [{"phase": "PreCopy", "time": "2026-12-04T10:00:00Z"}]}),
    );
    let (ctx, handle) = context(vec![], vec![]);
    // The task heard the end: completed, with its figures.
    ctx.migrations_followed.lock().expect("lock").insert(
        "m-uid".into(),
        hvx_operator::context::FollowedMigration {
            phase: Some(hvx_api::migration::MigrationPhase::Completed),
            memory_bytes: 64 << 20,
            disk_bytes: 4096,
            downtime_ms: 42,
            total_ms: 900,
            ended: true,
            ..Default::default()
        },
    );
    let (seen, followed) = migration_pass(ctx, handle, mig).await;
    assert_eq!(followed, 0, "the ended record is consumed");
    let writes: Vec<&Value> = seen
        .iter()
        .filter(|(m, p, _)| m == Method::PATCH && p.ends_with("/vmmigrations/m1/status"))
        .map(|(_, _, b)| &b["status"])
        .collect();
    assert_eq!(writes.len(), 1, "one status write: {writes:?}");
    let status = writes[0];
    assert_eq!(status["phase"], "Completed", "{status}");
    assert_eq!(status["downtimeMs"], 42, "{status}");
    assert_eq!(status["totalMs"], 900, "{status}");
    assert_eq!(status["postCopy"], false, "{status}");
    // PreCopy -> Completed is legal, and recorded once.
    assert_eq!(
        status["phaseTimestamps"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    let migrated = seen
        .iter()
        .any(|(m, p, b)| m == Method::POST && p.contains("/events") && b["reason"] == "Migrated");
    assert!(migrated, "a Migrated event");
}

#[tokio::test]
async fn cleanup_waits_for_a_node_whose_agent_is_unreachable_and_skips_a_node_that_is_gone() {
    // The application's pods are gone; its overlays may still be on every agent node.
    let obj = app(true, true);
    let mut config = OperatorConfig::default();
    // Nothing listens on port 1: the agent is down (connection refused at once).
    config.agents.port = 1;
    config.agents.timeout = Duration::from_secs(2);
    let (ctx, handle) = context_with_nodes(
        vec![obj.clone()],
        vec![],
        vec![],
        vec![agent_node("n1", "127.0.0.1", "True")],
        config.clone(),
    );
    let server = serve(handle, serde_json::to_value(&obj).expect("json"), vec![]);
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        hvx_operator::vmapp::reconcile(Arc::new(obj.clone()), ctx.clone()),
    )
    .await
    .expect("the pass ends");
    drop(ctx);
    let seen = server.await.expect("server");
    let err = result.expect_err("an unreachable agent that may hold overlays is an error");
    assert!(err.to_string().contains("n1"), "names the node: {err}");
    assert!(
        !seen
            .iter()
            .any(|(m, p, _)| *m == Method::PATCH && p.ends_with("/vmapplications/shop")),
        "the finalizer stays while a node may hold the overlays: {seen:?}"
    );

    // The node left the cluster (deleted): nothing of the VM can be there any more,
    // and the finalizer goes.
    let (ctx, handle) = context_with_nodes(vec![obj.clone()], vec![], vec![], vec![], config);
    let server = serve(handle, serde_json::to_value(&obj).expect("json"), vec![]);
    let action = tokio::time::timeout(
        Duration::from_secs(10),
        hvx_operator::vmapp::reconcile(Arc::new(obj.clone()), ctx.clone()),
    )
    .await
    .expect("the pass ends")
    .expect("cleanup with the node gone is done");
    drop(ctx);
    let seen = server.await.expect("server");
    assert_eq!(action, Action::await_change());
    let removal = seen
        .iter()
        .find(|(m, p, _)| *m == Method::PATCH && p.ends_with("/vmapplications/shop"))
        .unwrap_or_else(|| panic!("the finalizer is removed: {seen:?}"));
    assert!(
        removal.2.to_string().contains("remove"),
        "a JSON patch removing the finalizer: {}",
        removal.2
    );
}

fn one_vm_app() -> VmApplication {
    serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
        "metadata": {"name": "shop", "namespace": "prod", "uid": "u-1", "resourceVersion": "7",
                     "generation": 1, "finalizers": ["hvx.dev/cleanup"]},
        "spec": {"vms": [{"name": "db", "memoryMib": 256}]}
    }))
    .expect("app")
}

/// A pod a namespace user made with hvx's launcher labels, a disk move naming
/// another tenant's VM and the owner reference of their own application.
fn forged_pod(name: &str) -> Pod {
    let spec = json!({"namespace": "other", "application": "bank", "vmId": "u-9/vault",
                      "nics": [{"name": "ethernet0", "tap": "hvt000000000001"}]});
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "prod", "uid": "p-evil", "resourceVersion": "1",
                     "labels": {"hvx.dev/app": "shop", "hvx.dev/vm": "db", "hvx.dev/role": "launcher"},
                     "annotations": {"hvx.dev/launch-spec": spec.to_string(),
                                     "hvx.dev/disks-moved-from": "node-b"},
                     "ownerReferences": [{"apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
                                          "name": "shop", "uid": "u-1", "controller": true}]},
        "spec": {"containers": [], "nodeName": "node-a"},
        "status": {"phase": "Running"}
    }))
    .expect("pod")
}

#[tokio::test]
async fn a_forged_launcher_pod_counts_for_nothing_and_gets_one_warning() {
    let obj = one_vm_app();
    let forged = forged_pod("evil");
    let (ctx, handle) = context(vec![obj.clone()], vec![forged.clone()]);
    let server = serve(handle, serde_json::to_value(&obj).expect("json"), vec![]);
    tokio::time::timeout(
        Duration::from_secs(10),
        hvx_operator::vmapp::reconcile(Arc::new(obj.clone()), ctx.clone()),
    )
    .await
    .expect("pass ends")
    .expect("reconciled");
    // The forged pod is not the VM's pod: the VM's own pod is created beside it, and
    // nothing touches the forged one (no move, no clean-up, no delete).
    let warned = tokio::time::timeout(
        Duration::from_secs(10),
        hvx_operator::trust::warn_untrusted(
            ctx.clone(),
            futures::stream::iter([Arc::new(forged.clone()), Arc::new(forged.clone())]),
        ),
    );
    warned.await.expect("warning task ends with its stream");
    drop(ctx);
    let seen = server.await.expect("server");
    let paths: Vec<String> = seen.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    assert!(
        seen.iter().any(|(m, p, b)| *m == Method::POST
            && p == "/api/v1/namespaces/prod/pods"
            && b["metadata"]["name"] == "shop-db"),
        "{paths:#?}"
    );
    assert!(
        !paths
            .iter()
            .any(|p| p.contains("pods/evil") || p.starts_with("DELETE")),
        "{paths:#?}"
    );
    let status = seen
        .iter()
        .rev()
        .find(|(_, p, _)| p.ends_with("/vmapplications/shop/status"))
        .map(|(_, _, b)| b["status"].clone())
        .expect("status written");
    assert_eq!(status["vms"][0]["phase"], "Scheduling", "{status}");
    assert_eq!(status["vms"][0]["pod"], Value::Null, "{status}");
    // One warning, on the application, naming the pod and why.
    let warnings: Vec<&Value> = seen
        .iter()
        .filter(|(m, p, b)| {
            *m == Method::POST && p.ends_with("/events") && b["reason"] == "UntrustedPodIgnored"
        })
        .map(|(_, _, b)| b)
        .collect();
    assert_eq!(warnings.len(), 1, "{paths:#?}");
    assert_eq!(warnings[0]["type"], "Warning");
    assert_eq!(warnings[0]["regarding"]["kind"], "VmApplication");
    let note = warnings[0]["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("ignored pod evil") && note.contains("not the one hvx gives"),
        "{note}"
    );
}

#[tokio::test]
async fn an_edited_launch_spec_gets_the_pod_replaced_not_used() {
    let obj = one_vm_app();
    let mut edited = launcher_pod("db");
    edited.metadata.annotations.get_or_insert_default().insert(
        "hvx.dev/launch-spec".into(),
        json!({"namespace": "other", "application": "bank", "vmId": "u-9/vault"}).to_string(),
    );
    let (ctx, handle) = context(vec![obj.clone()], vec![edited]);
    let server = serve(handle, serde_json::to_value(&obj).expect("json"), vec![]);
    tokio::time::timeout(
        Duration::from_secs(10),
        hvx_operator::vmapp::reconcile(Arc::new(obj.clone()), ctx.clone()),
    )
    .await
    .expect("pass ends")
    .expect("reconciled");
    drop(ctx);
    let seen = server.await.expect("server");
    let paths: Vec<String> = seen.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    // That very pod goes (uid precondition); its replacement comes at the next pass.
    let deleted = seen
        .iter()
        .find(|(m, p, _)| *m == Method::DELETE && p == "/api/v1/namespaces/prod/pods/shop-db")
        .map(|(_, _, b)| b.clone())
        .unwrap_or_else(|| panic!("pod not deleted: {paths:#?}"));
    assert_eq!(deleted["preconditions"]["uid"], "p-db", "{deleted}");
    assert!(
        !seen
            .iter()
            .any(|(m, p, _)| *m == Method::POST && p.ends_with("/pods")),
        "{paths:#?}"
    );
    assert!(
        seen.iter().any(|(m, p, b)| *m == Method::POST
            && p.ends_with("/events")
            && b["reason"] == "UntrustedPodReplaced"
            && b["type"] == "Warning"),
        "{paths:#?}"
    );
    let status = seen
        .iter()
        .rev()
        .find(|(_, p, _)| p.ends_with("/vmapplications/shop/status"))
        .map(|(_, _, b)| b["status"].clone())
        .expect("status written");
    let reason = status["vms"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("replaced") && reason.contains("launch-spec"),
        "{status}"
    );
}

#[tokio::test]
async fn a_launcher_pod_refused_by_admission_shows_in_the_vms_reason_and_an_event() {
    let obj = one_vm_app();
    let (ctx, handle) = context(vec![obj.clone()], vec![]);
    let refusal = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "reason": "Forbidden", "code": 403,
        "message": "pods \"shop-db\" is forbidden: violates PodSecurity \"restricted:latest\": runAsNonRoot != true",
    });
    let server = serve_refusing(
        handle,
        serde_json::to_value(&obj).expect("json"),
        vec![],
        vec![(Method::POST, "/api/v1/namespaces/prod/pods", refusal)],
    );
    let action = tokio::time::timeout(
        Duration::from_secs(10),
        hvx_operator::vmapp::reconcile(Arc::new(obj.clone()), ctx.clone()),
    )
    .await
    .expect("pass ends")
    .expect("a refused pod is the user's to fix, not a reconcile error");
    drop(ctx);
    let seen = server.await.expect("server");
    let paths: Vec<String> = seen.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    assert!(
        seen.iter().any(|(m, p, b)| *m == Method::POST
            && p.ends_with("/events")
            && b["reason"] == hvx_operator::vmapp::REASON_POD_REFUSED
            && b["type"] == "Warning"
            && b["note"]
                .as_str()
                .is_some_and(|n| n.contains("PodSecurity"))),
        "{paths:#?}"
    );
    let status = seen
        .iter()
        .rev()
        .find(|(_, p, _)| p.ends_with("/vmapplications/shop/status"))
        .map(|(_, _, b)| b["status"].clone())
        .expect("status written");
    assert_eq!(status["vms"][0]["phase"], "Pending", "{status}");
    let reason = status["vms"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("refused launcher pod shop-db")
            && reason.contains("restricted:latest")
            && reason.contains("pod-security.kubernetes.io/enforce=baseline"),
        "{reason}"
    );
    // Looked at again soon: the namespace's level may change.
    assert_eq!(action, Action::requeue(hvx_operator::status::RESYNC_BUSY));
}

fn upload_disk() -> hvx_api::OverlayDisk {
    serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk",
        "metadata": {"name": "web-root", "namespace": "prod", "uid": "d-1",
                     "resourceVersion": "3", "generation": 1,
                     "finalizers": ["hvx.dev/cleanup"]},
        "spec": {"source": {"upload": {}}},
        "status": {"phase": "WaitingForUpload", "observedGeneration": 1},
    }))
    .expect("disk")
}

/// The upload endpoint only records progress (and wakes the disk); the disk's
/// reconcile is the one that writes it into the status: while bytes arrive, then
/// once the copies are complete.
#[tokio::test]
async fn the_disk_reconcile_writes_the_upload_progress_the_endpoint_recorded() {
    use hvx_operator::context::{UploadBook, UploadProgress, UploadSettings};
    let book = UploadBook::default();
    let mut wakeups = book.take_wakeups().expect("wake-ups");
    let mut progress = UploadProgress {
        bytes_done: 8 << 20,
        bytes_total: 32 << 20,
        complete: false,
        nodes: vec!["n1".into(), "n3".into()],
        sha256: String::new(),
    };
    book.record("prod", "web-root", "d-1", progress.clone());
    assert_eq!(
        wakeups.try_recv().expect("woken"),
        ("prod".to_string(), "web-root".to_string())
    );
    let config = OperatorConfig {
        upload: Some(UploadSettings {
            max_bytes: 1 << 40,
            book: book.clone(),
        }),
        ..OperatorConfig::default()
    };
    let status_writes = |seen: &common::Requests| -> Vec<Value> {
        seen.iter()
            .filter(|(m, p, _)| {
                m == Method::PATCH && p.ends_with("/namespaces/prod/overlaydisks/web-root/status")
            })
            .map(|(_, _, b)| b["status"].clone())
            .collect()
    };
    let pass = |config: OperatorConfig| async move {
        let (ctx, handle) = context_with_nodes(vec![], vec![], vec![], vec![], config);
        let api = serve(
            handle,
            serde_json::to_value(upload_disk()).expect("json"),
            vec![],
        );
        hvx_operator::disk::reconcile(Arc::new(upload_disk()), ctx.clone())
            .await
            .expect("pass");
        drop(ctx);
        api.await.expect("api")
    };
    let seen = pass(config.clone()).await;
    let writes = status_writes(&seen);
    assert_eq!(writes.len(), 1, "{seen:?}");
    // The phase was already WaitingForUpload: only what changed is written.
    assert_eq!(writes[0]["phase"], Value::Null, "{}", writes[0]);
    assert_eq!(writes[0]["bytesDone"], json!(8u64 << 20));
    assert_eq!(writes[0]["bytesTotal"], json!(32u64 << 20));
    assert!(
        writes[0]["progress"]
            .as_str()
            .is_some_and(|p| p.contains("25%") && p.contains("n1, n3")),
        "{}",
        writes[0]
    );
    // Complete on both nodes: Pending, all bytes.
    progress.bytes_done = 32 << 20;
    progress.complete = true;
    book.record("prod", "web-root", "d-1", progress);
    let writes = status_writes(&pass(config).await);
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0]["phase"], "Pending", "{}", writes[0]);
    assert_eq!(writes[0]["bytesDone"], json!(32u64 << 20));
}
