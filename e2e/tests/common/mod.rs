//! Helpers shared by the cluster-tier tests: client, CRD install, namespaces, examples.
#![allow(dead_code)]

pub mod guest;

use hvx_api::{OverlayDisk, VirtualNetwork, VmApplication, VmMigration};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

pub const MANAGER: &str = "hvx-e2e";

pub async fn client() -> Client {
    Client::try_default()
        .await
        .expect("KUBECONFIG must point at a running cluster (make cluster-up)")
}

pub async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in hvx_api::all_crds() {
        let name = crd.metadata.name.clone().expect("crd name");
        crds.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("installing CRD {name}: {e}"));
    }
    for (_, crd) in hvx_api::all_crds() {
        let name = crd.metadata.name.clone().expect("crd name");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got = crds.get(&name).await.expect("get crd");
            let established = got
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "CRD {name} not Established in 60s"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The Pod Security admission label that enforces a level in a namespace.
pub const PSA_ENFORCE: &str = "pod-security.kubernetes.io/enforce";
/// Which version of the level's rules.
pub const PSA_ENFORCE_VERSION: &str = "pod-security.kubernetes.io/enforce-version";

pub async fn fresh_namespace(client: &Client, name: &str) -> String {
    let nss: Api<Namespace> = Api::all(client.clone());
    let _ = nss.delete(name, &DeleteParams::default()).await;
    // Wait until a previous run's namespace is gone.
    for _ in 0..240 {
        if nss.get_opt(name).await.expect("get ns").is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Every test namespace enforces Pod Security `baseline`, the level hvx's launcher
    // pods are made for: a launcher needing more fails its test.
    let ns: Namespace = serde_json::from_value(json!({"metadata": {
        "name": name,
        "labels": {PSA_ENFORCE: "baseline", PSA_ENFORCE_VERSION: "latest"},
    }}))
    .expect("ns");
    nss.create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    name.to_owned()
}

pub fn api_for(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let ar = match kind {
        "VmApplication" => ApiResource::erase::<VmApplication>(&()),
        "VirtualNetwork" => ApiResource::erase::<VirtualNetwork>(&()),
        "OverlayDisk" => ApiResource::erase::<OverlayDisk>(&()),
        "VmMigration" => ApiResource::erase::<VmMigration>(&()),
        other => panic!("unexpected kind {other}"),
    };
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// Server-side apply with strict field validation, as `kubectl apply --server-side` does.
pub async fn apply(client: &Client, ns: &str, obj: &Value) -> Result<DynamicObject, kube::Error> {
    let kind = obj["kind"].as_str().expect("kind");
    let name = obj["metadata"]["name"].as_str().expect("name");
    let api = api_for(client, ns, kind);
    let mut params = PatchParams::apply(MANAGER).force();
    params.field_validation = Some(kube::api::ValidationDirective::Strict);
    api.patch(name, &params, &Patch::Apply(obj)).await
}

pub fn examples() -> Vec<Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("examples")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for f in files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let text = std::fs::read_to_string(&f).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).expect("yaml");
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    out
}

pub fn example(kind: &str) -> Value {
    examples()
        .into_iter()
        .find(|v| v["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} example"))
}

pub fn renamed(mut v: Value, name: &str) -> Value {
    v["metadata"] = json!({"name": name});
    v
}

/// Polls `check` every 250 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn delete_namespace(client: &Client, ns: &str) {
    let _ = Api::<Namespace>::all(client.clone())
        .delete(ns, &DeleteParams::default())
        .await;
}

/// Deletes a namespace and waits until it is gone, so the next test (which may run an
/// operator cluster-wide) never finds this one's objects half deleted.
pub async fn delete_namespace_and_wait(client: &Client, ns: &str) {
    delete_namespace(client, ns).await;
    let nss: Api<Namespace> = Api::all(client.clone());
    for _ in 0..240 {
        if nss.get_opt(ns).await.expect("get ns").is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("namespace {ns} still there 120 s after its deletion");
}
