//! Tenant isolation, acted out on the local cluster with hvx installed by Helm: a
//! ServiceAccount with only the built-in `edit` ClusterRole in its own namespace
//! attacks a VM of another namespace that runs (the caller's), the way issue 17
//! describes, and each attack must have no effect:
//!
//! (a) a pod with hvx launcher labels, the owner reference of its own application and
//!     `hvx.dev/disks-moved-from` naming the victim's node, whose launch spec names the
//!     victim's VM: the victim's overlay stays, its VM keeps running, and a Warning
//!     event names the forged pod;
//! (b) its own application's real launcher pod with the launch spec edited to the
//!     victim's VM: the operator replaces the pod; a copy of that pod bound to the
//!     victim's node, whose `vm.hvx.dev` volumes' attributes also name the victim's
//!     pod, gets nothing mounted (the node agent's CSI driver refuses it: a
//!     FailedMount event) and never starts;
//! (c) a pod naming the victim's tap in its launch spec: the tap stays on the
//!     victim's bridge.
//!
//! Plus: the agents' unauthenticated metrics port names no VM.
//!
//! The tenant's own VmApplication is created by the test's admin client (that `edit`
//! may manage hvx objects is checked in `access.rs`). Its VM never
//! boots (a node selector no node matches keeps its pod pending): the attacks need
//! its launcher pod, not a guest.

use super::common::guest::{RUN_ROOT, STORE_ROOT, netns_exec, vm_run_dir, wait_or_dump};
use super::common::{MANAGER, fresh_namespace};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Event, Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

/// The attacker's namespace.
pub const TENANT_NS: &str = "hvx-e2e-tenant";
const SA: &str = "intruder";

/// The VM under attack (running, in another namespace).
#[derive(Clone, Debug)]
pub struct Victim {
    /// Its namespace.
    pub ns: String,
    /// Its application's uid.
    pub app_uid: String,
    /// Its VM name.
    pub vm: String,
    /// The node it runs on.
    pub node: String,
    /// Its first NIC's name.
    pub nic: String,
    /// Its disks' names.
    pub disks: Vec<String>,
}

impl Victim {
    fn vm_id(&self) -> String {
        format!("{}/{}", self.app_uid, self.vm)
    }

    fn tap(&self) -> String {
        hvx_api::launch::tap_name(&self.vm_id(), &self.nic)
    }

    fn overlay_meta(&self, disk: &str) -> std::path::PathBuf {
        hvx_api::node::NodePaths::new(Path::new(STORE_ROOT), Path::new(RUN_ROOT), &self.node)
            .disk_store()
            .join("disks")
            .join(hvx_api::node::vm_key(&self.vm_id()))
            .join(disk)
            .join("disk.json")
    }

    fn run_dir(&self) -> std::path::PathBuf {
        vm_run_dir(&self.node, &self.app_uid, &self.vm)
    }
}

/// What must not change on the victim's side.
#[derive(Debug, PartialEq, Eq)]
struct VictimState {
    overlays: Vec<Option<Vec<u8>>>,
    tap_master: Option<String>,
    identity: Option<Vec<u8>>,
    pod_uid: Option<String>,
    phase: Option<String>,
}

async fn victim_state(admin: &Client, v: &Victim) -> VictimState {
    let link = netns_exec(&v.node, &["ip", "-o", "link", "show", &v.tap()]);
    let tap_master = link
        .split_whitespace()
        .skip_while(|w| *w != "master")
        .nth(1)
        .map(str::to_string);
    let apps: Api<hvx_api::VmApplication> = Api::namespaced(admin.clone(), &v.ns);
    let status = apps
        .get("shop")
        .await
        .ok()
        .and_then(|a| serde_json::to_value(a.status).ok())
        .unwrap_or_default();
    let vm = status["vms"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == v.vm.as_str()).cloned())
        .unwrap_or_default();
    VictimState {
        overlays: v
            .disks
            .iter()
            .map(|d| std::fs::read(v.overlay_meta(d)).ok())
            .collect(),
        tap_master,
        identity: std::fs::read(v.run_dir().join("vm.json")).ok(),
        pod_uid: {
            let pods: Api<Pod> = Api::namespaced(admin.clone(), &v.ns);
            let name = vm["pod"].as_str().unwrap_or_default().to_string();
            pods.get(&name).await.ok().and_then(|p| p.metadata.uid)
        },
        phase: vm["phase"].as_str().map(str::to_string),
    }
}

/// A client acting as `sa` of `ns` (a TokenRequest), for the cluster the admin's
/// kubeconfig names.
async fn client_as(admin: &Client, ns: &str, sa: &str) -> Client {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .expect("TokenRequest")
        .status
        .expect("token status")
        .token;
    let path = hvx_e2e::kubeconfig::kubeconfig_from_env().expect("KUBECONFIG");
    let kubeconfig = Kubeconfig::read_from(&path).expect("kubeconfig");
    // Same cluster, only the token as credentials (no client certificate).
    let mut v = serde_json::to_value(&kubeconfig).expect("kubeconfig json");
    if let Some(users) = v["users"].as_array_mut() {
        for u in users {
            u["user"] = json!({"token": token});
        }
    }
    let kubeconfig: Kubeconfig = serde_json::from_value(v).expect("kubeconfig back");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

async fn make_tenant(admin: &Client) {
    fresh_namespace(admin, TENANT_NS).await;
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), TENANT_NS);
    sas.patch(
        SA,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SA}}),
        ),
    )
    .await
    .expect("service account");
    let rbs: Api<RoleBinding> = Api::namespaced(admin.clone(), TENANT_NS);
    rbs.patch(
        "intruder-edit",
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "intruder-edit"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
            "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": TENANT_NS}],
        })),
    )
    .await
    .expect("role binding");
    // The tenant's own application: one VM on its own network, never scheduled.
    for obj in [
        json!({"apiVersion": "hvx.dev/v1alpha1", "kind": "VirtualNetwork",
               "metadata": {"name": "tnet"},
               "spec": {"subnets": [{"name": "s", "cidr": "10.78.0.0/24", "gateway": "10.78.0.1"}]}}),
        json!({"apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
               "metadata": {"name": "tenant"},
               "spec": {"vms": [{"name": "t1", "memoryMib": 64,
                                 "nics": [{"name": "ethernet0", "network": {"name": "tnet"},
                                           "macAddress": "00:50:56:a1:0e:01"}],
                                 "placement": {"nodeSelector": {"hvx-e2e/nowhere": "true"}}}]}}),
    ] {
        super::common::apply(admin, TENANT_NS, &obj)
            .await
            .unwrap_or_else(|e| panic!("applying {}: {e}", obj["metadata"]["name"]));
    }
}

/// The tenant's real launcher pod, once the operator made it (another than the pod
/// of uid `not`).
async fn own_launcher_pod(admin: &Client, not: Option<&str>) -> Pod {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), TENANT_NS);
    wait_or_dump(
        admin,
        TENANT_NS,
        "the tenant's launcher pod tenant-t1",
        Duration::from_secs(120),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get_opt("tenant-t1").await.ok()??;
                if not.is_some() && p.metadata.uid.as_deref() == not {
                    return None;
                }
                let sealed = p
                    .metadata
                    .annotations
                    .as_ref()?
                    .contains_key("hvx.dev/launch-spec-seal");
                (sealed && p.metadata.deletion_timestamp.is_none()).then_some(p)
            }
        },
    )
    .await
}

fn annotation(pod: &Pod, key: &str) -> String {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key).cloned())
        .unwrap_or_default()
}

/// The tenant's launch spec, re-aimed at the victim's VM (what an attacker would
/// write: the victim's VM id, disks and tap).
fn spec_aimed_at(own: &Pod, v: &Victim, tap_only: bool) -> String {
    let mut spec: Value =
        serde_json::from_str(&annotation(own, "hvx.dev/launch-spec")).expect("own launch spec");
    if tap_only {
        spec["nics"][0]["tap"] = json!(v.tap());
    } else {
        spec["vmId"] = json!(v.vm_id());
        spec["disks"] = json!(
            v.disks
                .iter()
                .map(|d| json!({"name": d, "diskUid": "forged"}))
                .collect::<Vec<_>>()
        );
        spec["nics"][0]["tap"] = json!(v.tap());
    }
    spec.to_string()
}

/// A busybox pod carrying hvx launcher labels and `annotations`, bound to `node`.
fn forged_pod(own: &Pod, name: &str, node: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"hvx.dev/app": "tenant", "hvx.dev/vm": "t1", "hvx.dev/role": "launcher"},
            "annotations": annotations,
            "ownerReferences": own.metadata.owner_references,
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "c", "image": hvx_e2e::objects::test_image(),
                            "command": ["sleep", "3600"]}],
        }
    })
}

async fn create_as(client: &Client, pod: &Value) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), TENANT_NS);
    let pod: Pod = serde_json::from_value(pod.clone()).expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("the tenant creates pod {:?}: {e}", pod.metadata.name));
}

/// Warning events of the tenant's namespace with `reason` naming `what`.
async fn wait_warning(admin: &Client, reason: &str, what: &str) {
    let events: Api<Event> = Api::namespaced(admin.clone(), TENANT_NS);
    wait_or_dump(
        admin,
        TENANT_NS,
        &format!("a Warning {reason} naming {what}"),
        Duration::from_secs(60),
        || {
            let events = events.clone();
            async move {
                let list = events.list(&ListParams::default()).await.ok()?;
                list.items
                    .iter()
                    .any(|e| {
                        e.type_.as_deref() == Some("Warning")
                            && e.reason.as_deref() == Some(reason)
                            && e.message.as_deref().unwrap_or_default().contains(what)
                    })
                    .then_some(())
            }
        },
    )
    .await;
}

/// The agents' metrics port (unauthenticated, on every node's address) names no VM.
async fn metrics_name_no_vm(admin: &Client, v: &Victim) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nodes: Api<Node> = Api::all(admin.clone());
    let node = nodes.get(&v.node).await.expect("victim's node");
    let ip = node
        .status
        .and_then(|s| s.addresses)
        .unwrap_or_default()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address)
        .expect("node address");
    let mut sock = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((ip.as_str(), hvx_api::node::AGENT_METRICS_PORT)),
    )
    .await
    .expect("connect in time")
    .expect("metrics port reachable");
    sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(20), sock.read_to_string(&mut body))
        .await
        .expect("metrics in time")
        .expect("metrics");
    assert!(
        body.contains("hvx_node_vms "),
        "node totals served:\n{body}"
    );
    assert!(
        !body.contains(&v.app_uid) && !body.contains("vm=\""),
        "the metrics port names VMs:\n{body}"
    );
}

/// Every attack of the module doc, against `v`; panics on the first that works.
pub async fn attacks_from_another_namespace_fail(admin: &Client, v: &Victim) {
    make_tenant(admin).await;
    let intruder = client_as(admin, TENANT_NS, SA).await;
    // The identity really is limited: the victim's namespace is out of its reach.
    let theirs: Api<Pod> = Api::namespaced(intruder.clone(), &v.ns);
    match theirs.list(&ListParams::default()).await {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => panic!("the intruder could list the victim's pods: {other:?}"),
    }
    let own = own_launcher_pod(admin, None).await;
    let before = victim_state(admin, v).await;
    assert!(
        before.overlays.iter().all(Option::is_some) && before.tap_master.is_some(),
        "the victim's overlays and tap are there to begin with: {before:?}"
    );
    assert_eq!(before.phase.as_deref(), Some("Running"));

    let nodes: Api<Node> = Api::all(admin.clone());
    let other_node = nodes
        .list(&ListParams::default())
        .await
        .expect("nodes")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .find(|n| *n != v.node)
        .expect("a second node");

    // (a) A forged pod, running, that says the victim's disks moved from its node.
    let seal = annotation(&own, "hvx.dev/launch-spec-seal");
    create_as(
        &intruder,
        &forged_pod(
            &own,
            "forged-move",
            &other_node,
            json!({"hvx.dev/launch-spec": spec_aimed_at(&own, v, false),
                   "hvx.dev/launch-spec-seal": seal,
                   "hvx.dev/disks-moved-from": v.node}),
        ),
    )
    .await;
    // (c) A forged pod on the victim's node whose NIC is the victim's tap.
    create_as(
        &intruder,
        &forged_pod(
            &own,
            "forged-tap",
            &v.node,
            json!({"hvx.dev/launch-spec": spec_aimed_at(&own, v, true),
                   "hvx.dev/launch-spec-seal": seal}),
        ),
    )
    .await;
    wait_warning(admin, "UntrustedPodIgnored", "forged-move").await;
    wait_warning(admin, "UntrustedPodIgnored", "forged-tap").await;
    // The operator's passes that could act on them ran by now (pod events wake the
    // application at once; its resync is 5 s while a VM is on its way): give them
    // a few more.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(
        victim_state(admin, v).await,
        before,
        "forged pods changed the victim's overlays, tap or VM"
    );

    // (b) The real launcher pod of its own application, its launch spec edited.
    let pods: Api<Pod> = Api::namespaced(intruder.clone(), TENANT_NS);
    let edited = spec_aimed_at(&own, v, false);
    pods.patch(
        "tenant-t1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"hvx.dev/launch-spec": edited}}})),
    )
    .await
    .expect("the intruder edits its own launcher pod");
    wait_warning(admin, "UntrustedPodReplaced", "tenant-t1").await;
    let replaced = own_launcher_pod(admin, own.metadata.uid.as_deref()).await;
    assert_ne!(
        replaced.metadata.uid, own.metadata.uid,
        "the edited pod was replaced"
    );
    assert_eq!(
        annotation(&replaced, "hvx.dev/launch-spec"),
        annotation(&own, "hvx.dev/launch-spec"),
        "the new pod carries the spec hvx made"
    );
    // A launcher whose spec was edited before it started (the same pod, bound where
    // the victim's VM runs), its vm.hvx.dev volumes' attributes also naming the
    // victim's pod: the node agent refuses to mount anything into it, so it never
    // starts (the launcher's own seal check, behind this, is unit-tested).
    let victim_pod: Api<Pod> = Api::namespaced(admin.clone(), &v.ns);
    let victim_pod = victim_pod
        .list(&ListParams::default().labels(&format!("hvx.dev/vm={},hvx.dev/role=launcher", v.vm)))
        .await
        .expect("victim's pods")
        .items
        .into_iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(v.node.as_str()))
        .expect("the victim's launcher pod");
    let mut copy = serde_json::to_value(&own).expect("pod json");
    copy["metadata"] = json!({
        "name": "forged-launcher",
        "annotations": {"hvx.dev/launch-spec": edited,
                        "hvx.dev/launch-spec-seal": seal},
    });
    copy["spec"]["nodeName"] = json!(v.node);
    for k in ["affinity", "nodeSelector"] {
        copy["spec"].as_object_mut().map(|s| s.remove(k));
    }
    for vol in copy["spec"]["volumes"].as_array_mut().into_iter().flatten() {
        // `get_mut`, not indexing: indexing would add a csi source to every volume.
        if let Some(attrs) = vol
            .get_mut("csi")
            .and_then(|c| c.get_mut("volumeAttributes"))
            .and_then(|a| a.as_object_mut())
        {
            attrs.insert(
                "csi.storage.k8s.io/pod.name".into(),
                json!(victim_pod.metadata.name),
            );
            attrs.insert("csi.storage.k8s.io/pod.namespace".into(), json!(v.ns));
            attrs.insert(
                "csi.storage.k8s.io/pod.uid".into(),
                json!(victim_pod.metadata.uid),
            );
        }
    }
    copy.as_object_mut().map(|o| o.remove("status"));
    create_as(&intruder, &copy).await;
    let events: Api<Event> = Api::namespaced(admin.clone(), TENANT_NS);
    let refusal = wait_or_dump(
        admin,
        TENANT_NS,
        "the node agent to refuse the copied launcher's volumes",
        Duration::from_secs(120),
        || {
            let events = events.clone();
            async move {
                let list = events.list(&ListParams::default()).await.ok()?;
                list.items.into_iter().find_map(|e| {
                    let message = e.message.unwrap_or_default();
                    (e.involved_object.name.as_deref() == Some("forged-launcher")
                        && e.reason.as_deref() == Some("FailedMount")
                        && message.contains("only into launcher pods hvx made"))
                    .then_some(message)
                })
            }
        },
    )
    .await;
    eprintln!("refused: {refusal}");
    let copied = pods.get("forged-launcher").await.expect("copied launcher");
    assert_eq!(
        hvx_e2e::objects::pod_phase(&copied),
        "Pending",
        "the copied launcher never starts"
    );
    let uid = copied.metadata.uid.clone().unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts
            .lines()
            .any(|l| l.contains(&uid) && l.contains("kubernetes.io~csi")),
        "something is mounted for the refused pod:\n{mounts}"
    );
    assert_eq!(
        victim_state(admin, v).await,
        before,
        "the refused launcher changed the victim's state"
    );

    metrics_name_no_vm(admin, v).await;
    super::common::guest::delete_all_hvx_objects(admin, TENANT_NS).await;
    super::common::delete_namespace(admin, TENANT_NS).await;
}
