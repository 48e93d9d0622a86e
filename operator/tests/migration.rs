//! A VmMigration whose target pod admission refuses (Pod Security stricter than
//! `baseline`, a quota, a policy engine), against a mocked API server and two fake
//! node agents (`common::agents`): the migration fails with the API server's words in
//! its status and a Warning event, the target the agent prepared is undone, and the
//! VM stays on its source. Before, the refusal was only a reconcile error, retried
//! with backoff for as long as the migration existed.

mod common;

use common::agents::{calls, fake_agents};
use common::{agent_node, operator_context, serve_refusing, store_of};
use http::Method;
use hvx_api::VmApplication;
use hvx_api::migration::VmMigration;
use hvx_api::seal::SealKey;
use hvx_operator::context::{Context, OperatorConfig};
use hvx_operator::stores::Stores;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

fn seal_key() -> SealKey {
    SealKey::new(b"migration-tests-key-0123456789abcdef")
}

/// The VM's running launcher pod on n1.
fn source_pod() -> Pod {
    let spec = json!({
        "namespace": "prod", "application": "shop", "vmId": "u-1/db",
        "vm": {"name": "db", "memoryMib": 256,
               "disks": [{"name": "root", "overlayDisk": {"name": "db-root"}, "controller": "pvscsi", "unit": 0}]},
        "disks": [{"name": "root", "diskUid": "d-1"}],
        "nics": []
    });
    let mut pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "shop-db", "namespace": "prod", "uid": "p-db", "resourceVersion": "1",
                     "labels": {"hvx.dev/app": "shop", "hvx.dev/vm": "db", "hvx.dev/role": "launcher"},
                     "annotations": {"hvx.dev/launch-spec": spec.to_string()},
                     "ownerReferences": [{"apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
                                          "name": "shop", "uid": "u-1", "controller": true}]},
        "spec": {"nodeName": "n1", "containers": []},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
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

/// A migration of db from n1 to n2, target chosen, waiting for its target pod.
fn migration() -> VmMigration {
    serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "VmMigration",
        "metadata": {"name": "db-to-n2", "namespace": "prod", "uid": "m-1234abcd", "generation": 1,
                     "finalizers": [hvx_operator::FINALIZER]},
        "spec": {"application": "shop", "vm": "db", "targetNode": "n2"},
        "status": {"phase": "Scheduling", "sourceNode": "n1", "targetNode": "n2",
                   "phaseTimestamps": [{"phase": "Scheduling", "time": k8s_openapi::jiff::Timestamp::now().to_string()}]}
    }))
    .expect("migration")
}

fn operator(port: u16) -> (Arc<Context>, common::ApiHandle) {
    let mut config = OperatorConfig::default();
    config.agents.port = port;
    config.agents.timeout = Duration::from_secs(5);
    let disk = serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk",
        "metadata": {"name": "db-root", "namespace": "prod", "uid": "d-1", "generation": 1},
        "spec": {"source": {"http": {"url": "http://images.example/db.vmdk"}}}
    }))
    .expect("disk");
    let stores = Stores::new(
        store_of(vec![
            agent_node("n1", "127.0.0.1", "True"),
            agent_node("n2", "127.0.0.2", "True"),
        ]),
        store_of(vec![source_pod()]),
        store_of(vec![migration()]),
        store_of(vec![]),
        store_of(vec![disk]),
        store_of(vec![application()]),
        seal_key(),
    );
    operator_context(stores, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_pod_refused_by_admission_fails_the_migration_with_the_reason() {
    let agents = fake_agents(vec![]).await;
    let (ctx, handle) = operator(agents.port);
    let refusal = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "reason": "Forbidden", "code": 403,
        "message": "pods \"shop-db-m1234a\" is forbidden: exceeded quota: vms, requested: pods=1, used: pods=4, limited: pods=4",
    });
    let mut own = serde_json::to_value(migration()).expect("json");
    own["kind"] = json!("VmMigration");
    let server = serve_refusing(
        handle,
        own,
        vec![],
        vec![(Method::POST, "/api/v1/namespaces/prod/pods", refusal)],
    );
    // Passes as the controller would run them: the first ones wait for the base's
    // import on n2 (a task of the operator), then the target pod is asked for.
    let started = std::time::Instant::now();
    loop {
        let action = tokio::time::timeout(
            Duration::from_secs(20),
            hvx_operator::migration::reconcile(Arc::new(migration()), ctx.clone()),
        )
        .await
        .expect("pass ends")
        .expect("a refused target pod fails the migration, it is not a reconcile error");
        if action == kube::runtime::controller::Action::await_change() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the migration never ended: {action:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(ctx);
    let seen = server.await.expect("server");
    let paths: Vec<String> = seen.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    assert!(
        seen.iter()
            .any(|(m, p, _)| *m == Method::POST && p == "/api/v1/namespaces/prod/pods"),
        "the target pod was asked for: {paths:#?}"
    );
    let status = seen
        .iter()
        .rev()
        .find(|(_, p, _)| p.ends_with("/vmmigrations/db-to-n2/status"))
        .map(|(_, _, b)| b["status"].clone())
        .expect("status written");
    assert_eq!(status["phase"], "Failed", "{status}");
    let reason = status["failureReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("refused launcher pod shop-db-m1234a") && reason.contains("exceeded quota"),
        "{reason}"
    );
    assert!(
        seen.iter().any(|(m, p, b)| *m == Method::POST
            && p.ends_with("/events")
            && b["reason"] == "MigrationFailed"
            && b["type"] == "Warning"),
        "{paths:#?}"
    );
    // The source was asked to end it (it never started there) and the target node's
    // side was prepared, then nothing else started the VM there.
    let (n1, n2) = (calls(&agents.n1), calls(&agents.n2));
    assert!(
        n1.iter().any(|c| c == "CancelMigration m-1234abcd"),
        "{n1:?}"
    );
    assert!(
        n2.iter().any(|c| c == "PrepareMigrationTarget m-1234abcd"),
        "{n2:?}"
    );
}
