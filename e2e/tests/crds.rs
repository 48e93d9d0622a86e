//! Cluster tier: the generated CRDs install into a real kube-apiserver, the examples
//! apply, and invalid objects are rejected by the schema and CEL rules with the
//! messages users will see. Runs against `$KUBECONFIG` (`make test-cluster`).

mod common;

use common::*;
use hvx_api::VmApplication;
use kube::api::Api;
use kube::{Client, CustomResourceExt};
use serde_json::{Value, json};

async fn expect_rejected(client: &Client, ns: &str, what: &str, obj: Value, needle: &str) {
    expect_rejected_with(client, ns, what, obj, needle, 422).await;
}

/// Server-side apply reports list-map key clashes while building the typed patch, as
/// 500 (upstream behaviour); everything else is 422 Invalid.
async fn expect_rejected_with(
    client: &Client,
    ns: &str,
    what: &str,
    obj: Value,
    needle: &str,
    code: u16,
) {
    match apply(client, ns, &obj).await {
        Ok(_) => panic!("{what}: the apiserver accepted an invalid object"),
        Err(kube::Error::Api(status)) => {
            assert!(
                status.message.contains(needle),
                "{what}: rejected, but the message does not say {needle:?}: {}",
                status.message
            );
            assert_eq!(status.code, code, "{what}: expected {code}, got {status:?}");
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
    expect_rejected_with(
        &client,
        &ns,
        "duplicate VM names",
        bad,
        "duplicate entries for key [name=\"db\"]",
        500,
    )
    .await;

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

    let mut bad = renamed(app.clone(), "dup-slot-number");
    bad["spec"]["vms"][0]["nics"][0]["pciSlotNumber"] = json!(160);
    bad["spec"]["vms"][0]["controllers"][0]["pciSlotNumber"] = json!(160);
    expect_rejected(
        &client,
        &ns,
        "PCI slot number clash",
        bad,
        "PCI slot numbers must be unique",
    )
    .await;

    let mut bad = renamed(app.clone(), "slot-number-range");
    bad["spec"]["vms"][0]["nics"][0]["pciSlotNumber"] = json!(31);
    expect_rejected(
        &client,
        &ns,
        "PCI slot number below 32",
        bad,
        "pciSlotNumber",
    )
    .await;

    let mut bad = renamed(app.clone(), "slot-number-ide");
    bad["spec"]["vms"][0]["nics"][0]["pciSlotNumber"] = json!(192);
    bad["spec"]["vms"][0]["disks"][0]["controller"] = json!("ide");
    expect_rejected(
        &client,
        &ns,
        "PCI slot numbers with IDE disks",
        bad,
        "pciSlotNumber needs the q35 chipset, which has no IDE controller",
    )
    .await;

    let mut bad = renamed(app.clone(), "writable-cdrom");
    bad["spec"]["vms"][0]["disks"][0]["cdrom"] = json!(true);
    expect_rejected(
        &client,
        &ns,
        "writable CD-ROM",
        bad,
        "a CD-ROM is read-only: set readOnly",
    )
    .await;

    let mut bad = renamed(app.clone(), "self-dep");
    bad["spec"]["vms"][1]["dependsOn"] = json!(["web"]);
    expect_rejected(
        &client,
        &ns,
        "dependency on itself",
        bad,
        "a VM cannot depend on itself",
    )
    .await;

    let mut bad = renamed(app.clone(), "delay-no-deps");
    // vms[0] (db) depends on nothing.
    bad["spec"]["vms"][0]["startDelaySeconds"] = json!(30);
    expect_rejected(
        &client,
        &ns,
        "start delay without dependencies",
        bad,
        "startDelaySeconds counts from the start of the VMs in dependsOn",
    )
    .await;

    let mut bad = renamed(app.clone(), "unknown-field");
    bad["spec"]["vms"][0]["nics"][0]["macAdress"] = json!("00:50:56:00:00:09");
    expect_rejected_with(
        &client,
        &ns,
        "unknown field",
        bad,
        "macAdress: field not declared in schema",
        500,
    )
    .await;

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

    let mut bad = renamed(disk.clone(), "blank-no-size");
    bad["spec"]["source"] = json!({"blank": {}});
    expect_rejected(
        &client,
        &ns,
        "blank disk without capacity",
        bad,
        "a blank disk needs capacity",
    )
    .await;

    let mut bad = renamed(disk.clone(), "blank-checksum");
    bad["spec"]["source"] = json!({"blank": {}});
    bad["spec"]["capacity"] = json!("10Gi");
    bad["spec"]["checksum"] = json!(format!("sha256:{}", "0".repeat(64)));
    expect_rejected(
        &client,
        &ns,
        "blank disk with a checksum",
        bad,
        "a blank disk has no source bytes to check",
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

    let mut bad = renamed(disk.clone(), "pvc-unsupported");
    bad["spec"]["source"] = json!({"pvc": {"claimName": "images", "path": "disk.vmdk"}});
    expect_rejected(
        &client,
        &ns,
        "pvc source",
        bad,
        "pvc sources are not supported by this hvx version: use http, ova, upload or clone",
    )
    .await;

    let mut bad = renamed(disk.clone(), "clone-snapshot");
    bad["spec"]["source"] = json!({"clone": {"overlayDisk": "web-root", "snapshot": "before"}});
    expect_rejected(
        &client,
        &ns,
        "clone of a snapshot",
        bad,
        "cloning a snapshot is not supported by this hvx version",
    )
    .await;

    let mut bad = renamed(disk.clone(), "ova-no-url");
    bad["spec"]["source"] = json!({"ova": {"member": "disk1.vmdk"}});
    expect_rejected(
        &client,
        &ns,
        "ova source without url",
        bad,
        "an ova source needs url",
    )
    .await;

    let mut bad = renamed(disk.clone(), "ova-file-url");
    bad["spec"]["source"] = json!({"ova": {"url": "file:///srv/app.ova", "member": "disk1.vmdk"}});
    expect_rejected(
        &client,
        &ns,
        "ova source with a file URL",
        bad,
        "url must be an http or https URL",
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

    delete_namespace_and_wait(&client, &ns).await;
}
