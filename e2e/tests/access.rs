//! Cluster tier: the chart's least-privilege objects against a real API server
//! (`$KUBECONFIG`; `make test-cluster` runs it against the harness's). It renders
//! rbac.yaml, node-restriction.yaml and upload.yaml with `helm template` for a test
//! namespace (cluster-scoped names get a test suffix, so an installed hvx is not
//! touched), applies them, and then acts as the ServiceAccounts:
//! - the agent, with a token bound to a pod on node A, may label node A but not
//!   node B, nor change node A's spec; it may write node A's liveness Lease (held by
//!   node A) and no other; a token bound to no pod changes nothing;
//! - the operator, with the chart's ClusterRole, runs the upload endpoint's
//!   TokenReview and SubjectAccessReview (`hvx_operator::upload::KubeAccess`): a
//!   ServiceAccount with namespace `edit` may upload in its namespace (through the
//!   aggregated role) and not in another one; a forged token is not accepted;
//! - that ServiceAccount may create and delete hvx objects in its namespace (the
//!   chart's role aggregated into `edit`), not in another one, and never their status.
//!
//! The two fake Nodes are unschedulable and tainted; everything is deleted at the end.

mod common;

use common::*;
use hvx_operator::upload::{Access, Denied, KubeAccess};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

const NS: &str = "hvx-access-test";
const OTHER_NS: &str = "hvx-access-test-other";
const SUFFIX: &str = "-access-test";
const NODE_A: &str = "hvx-access-test-a";
const NODE_B: &str = "hvx-access-test-b";

fn helm() -> PathBuf {
    if let Ok(h) = std::env::var("HELM")
        && !h.is_empty()
    {
        return PathBuf::from(h);
    }
    let cache = std::env::var("HVX_CACHE").unwrap_or_else(|_| "/var/cache/hvx".into());
    let pinned = Path::new(&cache)
        .join("k8s")
        .join(hvx_e2e::tools::HARNESS_K8S_VERSION)
        .join("bin/helm");
    if pinned.is_file() {
        pinned
    } else {
        PathBuf::from("helm")
    }
}

/// The chart's access objects for namespace `NS`, cluster-scoped names suffixed.
fn rendered() -> Vec<Value> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/hvx");
    let out = std::process::Command::new(helm())
        .args(["template", "hvx"])
        .arg(&chart)
        .args(["--namespace", NS])
        // The chart requires a Kubernetes version helm cannot know offline.
        .args(["--kube-version", hvx_e2e::tools::HARNESS_K8S_VERSION])
        .args(["--show-only", "templates/rbac.yaml"])
        .args(["--show-only", "templates/node-restriction.yaml"])
        .args(["--show-only", "templates/upload.yaml"])
        .output()
        .expect("running helm (set HELM, or make cluster-up builds it)");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf8");
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("yaml");
        if v.is_null() {
            continue;
        }
        docs.push(suffixed(v));
    }
    docs
}

/// Renames cluster-scoped objects (and references to them) so the test's copies sit
/// beside an installed hvx.
fn suffixed(mut v: Value) -> Value {
    let kind = v["kind"].as_str().unwrap_or_default().to_string();
    let rename = |s: &mut Value| {
        if let Some(n) = s.as_str()
            && !n.ends_with(SUFFIX)
        {
            *s = Value::String(format!("{n}{SUFFIX}"));
        }
    };
    match kind.as_str() {
        "ClusterRole" | "ValidatingAdmissionPolicy" => rename(&mut v["metadata"]["name"]),
        "ClusterRoleBinding" => {
            rename(&mut v["metadata"]["name"]);
            rename(&mut v["roleRef"]["name"]);
        }
        "ValidatingAdmissionPolicyBinding" => {
            rename(&mut v["metadata"]["name"]);
            rename(&mut v["spec"]["policyName"]);
        }
        _ => {}
    }
    v
}

fn resource_of(v: &Value) -> (ApiResource, bool) {
    let (group, version) = match v["apiVersion"].as_str().unwrap_or_default().split_once('/') {
        Some((g, ver)) => (g.to_string(), ver.to_string()),
        None => (
            String::new(),
            v["apiVersion"].as_str().unwrap_or_default().to_string(),
        ),
    };
    let kind = v["kind"].as_str().unwrap_or_default();
    let gvk = GroupVersionKind::gvk(&group, &version, kind);
    let plural = match kind {
        "ValidatingAdmissionPolicy" => "validatingadmissionpolicies".to_string(),
        "NetworkPolicy" => "networkpolicies".to_string(),
        k => format!("{}s", k.to_lowercase()),
    };
    let cluster = matches!(
        kind,
        "ClusterRole"
            | "ClusterRoleBinding"
            | "ValidatingAdmissionPolicy"
            | "ValidatingAdmissionPolicyBinding"
    );
    (ApiResource::from_gvk_with_plural(&gvk, &plural), cluster)
}

fn api_of(client: &Client, v: &Value) -> Api<DynamicObject> {
    let (ar, cluster) = resource_of(v);
    if cluster {
        Api::all_with(client.clone(), &ar)
    } else {
        let ns = v["metadata"]["namespace"].as_str().unwrap_or(NS);
        Api::namespaced_with(client.clone(), ns, &ar)
    }
}

async fn apply_all(client: &Client, docs: &[Value]) {
    for v in docs {
        let name = v["metadata"]["name"].as_str().expect("name");
        let obj: DynamicObject = serde_json::from_value(v.clone()).expect("object");
        api_of(client, v)
            .patch(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("applying {} {name}: {e}", v["kind"]));
    }
}

async fn delete_all(client: &Client, docs: &[Value]) {
    for v in docs {
        let name = v["metadata"]["name"].as_str().unwrap_or_default();
        let _ = api_of(client, v)
            .delete(name, &DeleteParams::default())
            .await;
    }
    let nodes: Api<Node> = Api::all(client.clone());
    for n in [NODE_A, NODE_B] {
        let _ = nodes.delete(n, &DeleteParams::default()).await;
    }
    let nss: Api<Namespace> = Api::all(client.clone());
    for ns in [NS, OTHER_NS] {
        let _ = nss.delete(ns, &DeleteParams::default()).await;
    }
}

async fn create<K>(api: &Api<K>, obj: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("creating {:?}: {e}", obj.meta().name))
}

/// A token of ServiceAccount `ns/sa`, bound to `pod` when given.
async fn token(client: &Client, ns: &str, sa: &str, pod: Option<&Pod>) -> String {
    let mut spec = json!({"audiences": [], "expirationSeconds": 600});
    if let Some(p) = pod {
        spec["boundObjectRef"] = json!({
            "apiVersion": "v1", "kind": "Pod",
            "name": p.metadata.name, "uid": p.metadata.uid,
        });
    }
    // No audiences: the API server's own.
    spec.as_object_mut().map(|o| o.remove("audiences"));
    let req: TokenRequest = serde_json::from_value(json!({"spec": spec})).expect("request");
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let got: TokenRequest = api
        .create_subresource("token", sa, &PostParams::default(), &req)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{sa}: {e}"));
    got.status.expect("token status").token
}

/// A client for the same API server acting with `token` only.
async fn client_with_token(token: &str) -> Client {
    let path = hvx_e2e::kubeconfig::kubeconfig_from_env().expect("KUBECONFIG");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.to_string().into()),
        ..Default::default()
    };
    Client::try_from(config).expect("client")
}

fn fake_node(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"hvx.dev/access-test": "true"}},
        "spec": {
            "unschedulable": true,
            "taints": [{"key": "hvx.dev/access-test", "effect": "NoSchedule"}]
        }
    })
}

async fn label(client: &Client, node: &str, value: &str) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"hvx.dev/agent": value}}})),
        )
        .await
        .map(|_| ())
}

/// Creates, or renews, the liveness lease of `node` held by `holder`, as the agent does.
async fn write_lease(client: &Client, node: &str, holder: &str) -> Result<(), kube::Error> {
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let name = format!("hvx-agent-{node}");
    let spec = json!({"holderIdentity": holder, "leaseDurationSeconds": 20,
                      "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                          k8s_openapi::jiff::Timestamp::now())});
    match leases
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"hvx.dev/agent-lease": "true"}},
                "spec": spec,
            }))
            .map_err(kube::Error::SerdeError)?;
            leases
                .create(&PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        other => other.map(|_| ()),
    }
}

fn forbidden_saying(r: Result<(), kube::Error>, needle: &str, what: &str) {
    match r {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{what}: {s:?}");
            assert!(s.message.contains(needle), "{what}: {}", s.message);
        }
        other => panic!("{what}: expected a 403 saying {needle:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn chart_rbac_and_node_restriction_hold() {
    let admin = hvx_e2e::kubeconfig::client_from_env()
        .await
        .expect("KUBECONFIG must point at a running API server");
    let docs = rendered();
    delete_all(&admin, &docs).await;
    fresh_namespace(&admin, NS).await;
    fresh_namespace(&admin, OTHER_NS).await;
    let result = tokio::time::timeout(Duration::from_secs(240), checks(&admin, &docs)).await;
    delete_all(&admin, &docs).await;
    result.expect("access checks took over 240 s");
}

async fn checks(admin: &Client, docs: &[Value]) {
    install_crds(admin).await;
    apply_all(admin, docs).await;
    let nodes: Api<Node> = Api::all(admin.clone());
    for n in [NODE_A, NODE_B] {
        let _ = nodes.delete(n, &DeleteParams::default()).await;
        create(&nodes, fake_node(n)).await;
    }

    // The agent: a pod of the agent's ServiceAccount on node A (it never runs).
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let pod = create(
        &pods,
        json!({
            "metadata": {"name": "agent-a"},
            "spec": {
                "serviceAccountName": "hvx-agent",
                "automountServiceAccountToken": false,
                "nodeName": NODE_A,
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "c", "image": "localhost/none:1"}]
            }
        }),
    )
    .await;
    let agent = client_with_token(&token(admin, NS, "hvx-agent", Some(&pod)).await).await;
    // The policy takes effect within seconds of its creation.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match label(&agent, NODE_B, "ready").await {
            Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("may not change") => {
                break;
            }
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the agent bound to {NODE_A} could still patch {NODE_B}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    label(&agent, NODE_A, "ready")
        .await
        .expect("the agent labels its own node");
    let a = nodes.get(NODE_A).await.expect("node a");
    assert_eq!(
        a.metadata
            .labels
            .unwrap_or_default()
            .get("hvx.dev/agent")
            .map(String::as_str),
        Some("ready")
    );
    forbidden_saying(
        label(&agent, NODE_B, "ready").await,
        &format!("the hvx agent on node {NODE_A} may not change node {NODE_B}"),
        "another node",
    );
    let spec_change = Api::<Node>::all(agent.clone())
        .patch(
            NODE_A,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": false}})),
        )
        .await
        .map(|_| ());
    forbidden_saying(
        spec_change,
        "only labels, annotations and conditions",
        "spec of its node",
    );
    // RBAC still bounds it: no deletes, no pods.
    let del = Api::<Node>::all(agent.clone())
        .delete(NODE_A, &DeleteParams::default())
        .await
        .map(|_| ());
    assert!(
        matches!(del, Err(kube::Error::Api(ref s)) if s.code == 403),
        "{del:?}"
    );
    let list = Api::<Pod>::all(agent.clone())
        .list(&Default::default())
        .await;
    assert!(
        matches!(list, Err(kube::Error::Api(ref s)) if s.code == 403),
        "{list:?}"
    );
    // The endpoints of default/kubernetes are readable (http source policy); a
    // control plane that publishes only EndpointSlices answers 404, not 403.
    let ep = Api::<k8s_openapi::api::core::v1::Endpoints>::namespaced(agent.clone(), "default")
        .get("kubernetes")
        .await;
    assert!(
        !matches!(ep, Err(kube::Error::Api(ref s)) if s.code == 403),
        "the agent may not read the API server's endpoints: {ep:?}"
    );
    // A token bound to no pod carries no node: refused.
    let unbound = client_with_token(&token(admin, NS, "hvx-agent", None).await).await;
    forbidden_saying(
        label(&unbound, NODE_A, "x").await,
        "bound to no node",
        "unbound token",
    );

    // Liveness leases: its own node's only, held by its node.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match write_lease(&agent, NODE_B, NODE_B).await {
            Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("may write only") => {
                break;
            }
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the agent bound to {NODE_A} could write {NODE_B}'s lease: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    write_lease(&agent, NODE_A, NODE_A)
        .await
        .expect("the agent creates its own node's lease");
    write_lease(&agent, NODE_A, NODE_A)
        .await
        .expect("the agent renews its own node's lease");
    forbidden_saying(
        write_lease(&agent, NODE_A, NODE_B).await,
        "holder of an hvx agent lease is its node",
        "its lease held by another node",
    );
    forbidden_saying(
        write_lease(&unbound, NODE_A, NODE_A).await,
        "bound to no node",
        "a lease with an unbound token",
    );

    // The operator's upload checks, as the operator's ServiceAccount.
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), NS);
    create(&sas, json!({"metadata": {"name": "tenant"}})).await;
    let sas_other: Api<ServiceAccount> = Api::namespaced(admin.clone(), OTHER_NS);
    create(&sas_other, json!({"metadata": {"name": "tenant"}})).await;
    for ns in [NS, OTHER_NS] {
        let rbs: Api<k8s_openapi::api::rbac::v1::RoleBinding> = Api::namespaced(admin.clone(), ns);
        create(
            &rbs,
            json!({
                "metadata": {"name": "tenant-edit"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
                "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": ns}]
            }),
        )
        .await;
    }
    let operator = client_with_token(&token(admin, NS, "hvx-operator", None).await).await;
    let access = KubeAccess::new(operator);
    let tenant_token = token(admin, NS, "tenant", None).await;
    let caller = access
        .authenticate(&tenant_token)
        .await
        .expect("the operator's TokenReview accepts a real token");
    assert_eq!(
        caller.username,
        format!("system:serviceaccount:{NS}:tenant")
    );
    assert!(matches!(
        access.authenticate("forged.token.value").await,
        Err(Denied::Unauthenticated(_))
    ));
    // Namespace edit includes overlaydisks/upload once the aggregation controller
    // has merged the chart's role into it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for verb in ["create", "get"] {
        loop {
            match access.authorize(&caller, verb, NS, "web-root").await {
                Ok(()) => break,
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "edit in {NS} does not grant {verb} overlaydisks/upload: {e:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    match access
        .authorize(&caller, "create", OTHER_NS, "web-root")
        .await
    {
        Err(Denied::Forbidden(msg)) => assert!(
            msg.contains(&format!(
                "may not create overlaydisks/upload web-root in namespace {OTHER_NS}"
            )),
            "{msg}"
        ),
        other => panic!("a tenant of {NS} may upload into {OTHER_NS}: {other:?}"),
    }

    tenant_manages_own_objects(&client_with_token(&tenant_token).await).await;
}

/// Namespace `edit` includes hvx's resources (the chart's aggregated role) in its
/// own namespace only, and never their status (the operator's alone).
async fn tenant_manages_own_objects(tenant: &Client) {
    let net = |name: &str| {
        json!({"apiVersion": "hvx.dev/v1alpha1", "kind": "VirtualNetwork",
               "metadata": {"name": name},
               "spec": {"subnets": [{"name": "s", "cidr": "10.79.0.0/24", "gateway": "10.79.0.1"}]}})
    };
    let gvk = GroupVersionKind::gvk("hvx.dev", "v1alpha1", "VirtualNetwork");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "virtualnetworks");
    let own: Api<DynamicObject> = Api::namespaced_with(tenant.clone(), NS, &ar);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let obj: DynamicObject = serde_json::from_value(net("tenant-net")).expect("object");
        match own.create(&PostParams::default(), &obj).await {
            Ok(_) => break,
            Err(kube::Error::Api(s)) if s.code == 403 => assert!(
                tokio::time::Instant::now() < deadline,
                "edit in {NS} does not grant creating VirtualNetworks: {}",
                s.message
            ),
            Err(e) => panic!("creating a VirtualNetwork as the tenant: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = Patch::Merge(json!({"status": {"phase": "Ready"}}));
    forbidden_saying(
        own.patch_status("tenant-net", &PatchParams::default(), &status)
            .await
            .map(|_| ()),
        "virtualnetworks/status",
        "a tenant writing its VirtualNetwork's status",
    );
    let other: Api<DynamicObject> = Api::namespaced_with(tenant.clone(), OTHER_NS, &ar);
    let obj: DynamicObject = serde_json::from_value(net("intruder-net")).expect("object");
    forbidden_saying(
        other.create(&PostParams::default(), &obj).await.map(|_| ()),
        &format!("in the namespace \"{OTHER_NS}\""),
        "a tenant creating a VirtualNetwork in another namespace",
    );
    own.delete("tenant-net", &DeleteParams::default())
        .await
        .expect("the tenant deletes its own VirtualNetwork");
}
