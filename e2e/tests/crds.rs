//! Cluster tier: the generated CRDs install into a real kube-apiserver, the examples
//! apply, and invalid objects are rejected by the schema and CEL rules with the
//! messages users will see. Runs against `$KUBECONFIG` (`make test-cluster`).

use hvx_api::{OverlayDisk, VirtualNetwork, VmApplication, VmMigration};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::{Client, CustomResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

const MANAGER: &str = "hvx-e2e";

async fn client() -> Client {
    Client::try_default()
        .await
        .expect("KUBECONFIG must point at a running cluster (make cluster-up)")
}

async fn install_crds(client: &Client) {
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

async fn fresh_namespace(client: &Client, name: &str) -> String {
    let nss: Api<Namespace> = Api::all(client.clone());
    let _ = nss.delete(name, &DeleteParams::default()).await;
    // Wait until a previous run's namespace is gone.
    for _ in 0..240 {
        if nss.get_opt(name).await.expect("get ns").is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
    nss.create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    name.to_owned()
}

fn api_for(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
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
async fn apply(client: &Client, ns: &str, obj: &Value) -> Result<DynamicObject, kube::Error> {
    let kind = obj["kind"].as_str().expect("kind");
    let name = obj["metadata"]["name"].as_str().expect("name");
    let api = api_for(client, ns, kind);
    let mut params = PatchParams::apply(MANAGER).force();
    params.field_validation = Some(kube::api::ValidationDirective::Strict);
    api.patch(name, &params, &Patch::Apply(obj)).await
}

fn examples() -> Vec<Value> {
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

fn example(kind: &str) -> Value {
    examples()
        .into_iter()
        .find(|v| v["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} example"))
}

fn renamed(mut v: Value, name: &str) -> Value {
    v["metadata"] = json!({"name": name});
    v
}

async fn expect_rejected(client: &Client, ns: &str, what: &str, obj: Value, needle: &str) {
    match apply(client, ns, &obj).await {
        Ok(_) => panic!("{what}: the apiserver accepted an invalid object"),
        Err(kube::Error::Api(status)) => {
            assert!(
                status.message.contains(needle),
                "{what}: rejected, but the message does not say {needle:?}: {}",
                status.message
            );
            assert_eq!(
                status.code, 422,
                "{what}: expected 422 Invalid, got {status:?}"
            );
        }
        Err(other) => panic!("{what}: unexpected error {other}"),
    }
}

#[tokio::test]
async fn crds_install_examples_apply_and_invalid_objects_are_rejected() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "hvx-e2e-crds").await;

    for obj in examples() {
        apply(&client, &ns, &obj)
            .await
            .unwrap_or_else(|e| panic!("example {} rejected: {e}", obj["metadata"]["name"]));
    }
    // The typed client reads them back (schema defaults applied by the apiserver).
    let apps: Api<VmApplication> = Api::namespaced(client.clone(), &ns);
    let shop = apps.get("shop").await.expect("typed get");
    assert_eq!(shop.spec.vms.len(), 2);
    assert_eq!(
        shop.spec.vms[0].shutdown_grace_seconds, 120,
        "default applied"
    );
    assert_eq!(
        VmApplication::crd()
            .spec
            .names
            .short_names
            .unwrap_or_default(),
        vec!["vmapp", "vmapps"]
    );

    let app = example("VmApplication");
    let net = example("VirtualNetwork");
    let disk = example("OverlayDisk");

    let mut bad = renamed(app.clone(), "bad-mac");
    bad["spec"]["vms"][0]["nics"][0]["macAddress"] = json!("00:50:56:zz:00:01");
    expect_rejected(&client, &ns, "malformed MAC", bad, "macAddress").await;

    let mut bad = renamed(app.clone(), "multicast-mac");
    bad["spec"]["vms"][0]["nics"][0]["macAddress"] = json!("01:00:5e:00:00:01");
    expect_rejected(&client, &ns, "multicast MAC", bad, "macAddress").await;

    let mut bad = renamed(app.clone(), "dup-vm");
    let first = bad["spec"]["vms"][0].clone();
    bad["spec"]["vms"][1] = first;
    expect_rejected(&client, &ns, "duplicate VM names", bad, "Duplicate value").await;

    let mut bad = renamed(app.clone(), "dup-scsi");
    let mut second = bad["spec"]["vms"][0]["disks"][0].clone();
    second["name"] = json!("data");
    bad["spec"]["vms"][0]["disks"]
        .as_array_mut()
        .expect("disks")
        .push(second);
    expect_rejected(
        &client,
        &ns,
        "duplicate SCSI address",
        bad,
        "each disk needs its own controller/bus/unit address",
    )
    .await;

    let mut bad = renamed(app.clone(), "scsi-unit-7");
    bad["spec"]["vms"][0]["disks"][0]["unit"] = json!(7);
    expect_rejected(
        &client,
        &ns,
        "SCSI unit 7",
        bad,
        "SCSI disks use unit 0-63 except 7",
    )
    .await;

    let mut bad = renamed(app.clone(), "dup-slot");
    bad["spec"]["vms"][0]["nics"][0]["pciSlot"] = json!(5);
    expect_rejected(
        &client,
        &ns,
        "PCI slot clash",
        bad,
        "PCI slots must be unique",
    )
    .await;

    let mut bad = renamed(app.clone(), "bad-dep");
    bad["spec"]["vms"][1]["dependsOn"] = json!(["nosuchvm"]);
    expect_rejected(
        &client,
        &ns,
        "dependency on a missing VM",
        bad,
        "dependsOn must name other VMs",
    )
    .await;

    let mut bad = renamed(app.clone(), "unknown-field");
    bad["spec"]["vms"][0]["nics"][0]["macAdress"] = json!("00:50:56:00:00:09");
    expect_rejected(&client, &ns, "unknown field", bad, "unknown field").await;

    let mut bad = renamed(net.clone(), "gw-outside");
    bad["spec"]["subnets"][0]["gateway"] = json!("10.99.0.1");
    expect_rejected(
        &client,
        &ns,
        "gateway outside CIDR",
        bad,
        "gateway must lie inside cidr",
    )
    .await;

    let mut bad = renamed(net.clone(), "host-bits");
    bad["spec"]["subnets"][0]["cidr"] = json!("10.77.0.5/24");
    expect_rejected(
        &client,
        &ns,
        "CIDR with host bits",
        bad,
        "cidr must not have host bits set",
    )
    .await;

    let mut bad = renamed(net.clone(), "not-a-cidr");
    bad["spec"]["subnets"][0]["cidr"] = json!("banana");
    expect_rejected(
        &client,
        &ns,
        "CIDR garbage",
        bad,
        "cidr must be an IPv4 CIDR",
    )
    .await;

    let mut bad = renamed(disk.clone(), "two-sources");
    bad["spec"]["source"]["blank"] = json!({});
    expect_rejected(
        &client,
        &ns,
        "two disk sources",
        bad,
        "exactly one of http, pvc, upload, ova, clone, blank",
    )
    .await;

    let mut bad = renamed(disk.clone(), "pvc-escape");
    bad["spec"]["source"] = json!({"pvc": {"claimName": "images", "path": "../../etc/shadow"}});
    expect_rejected(
        &client,
        &ns,
        "PVC path traversal",
        bad,
        "path must be relative",
    )
    .await;

    // Immutable fields: change the MAC of an existing NIC.
    let mut changed = app.clone();
    changed["spec"]["vms"][0]["nics"][0]["macAddress"] = json!("00:50:56:a1:00:99");
    expect_rejected(
        &client,
        &ns,
        "MAC change",
        changed,
        "macAddress is immutable",
    )
    .await;

    let mut changed = disk.clone();
    changed["spec"]["source"]["http"]["url"] = json!("http://elsewhere.example/disk.vmdk");
    expect_rejected(
        &client,
        &ns,
        "disk source change",
        changed,
        "source is immutable",
    )
    .await;

    let _ = Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::default())
        .await;
}
