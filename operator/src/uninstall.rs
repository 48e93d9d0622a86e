//! `hvx-operator uninstall`: the Helm pre-delete hook. Deletes every hvx object in every
//! namespace while the operator is still running, so the usual finalizers stop VMs
//! and clean nodes, then waits until they are gone. A lost node does not hold this up:
//! the finalizers record what it owes instead (`owed`), and those records are dropped
//! here at the end, since no operator is left to replay them.

use hvx_api::{OverlayDisk, VirtualNetwork, VmApplication, VmMigration};
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::time::Duration;

/// Deletes all hvx objects, applications first (their VMs hold disks and ports), and
/// waits up to `timeout` for them to disappear; then drops the records of cleanup owed
/// to lost nodes in `namespace`. Returns the objects still present.
pub async fn uninstall(
    client: Client,
    namespace: &str,
    timeout: Duration,
) -> Result<Vec<String>, kube::Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    delete_all::<VmMigration>(&client).await?;
    delete_all::<VmApplication>(&client).await?;
    wait_gone::<VmApplication>(&client, deadline).await?;
    delete_all::<OverlayDisk>(&client).await?;
    delete_all::<VirtualNetwork>(&client).await?;
    let mut left = Vec::new();
    left.extend(wait_gone::<VmMigration>(&client, deadline).await?);
    left.extend(wait_gone::<VmApplication>(&client, deadline).await?);
    left.extend(wait_gone::<OverlayDisk>(&client, deadline).await?);
    left.extend(wait_gone::<VirtualNetwork>(&client, deadline).await?);
    if left.is_empty() {
        drop_owed(&client, namespace).await?;
        unlabel_nodes(&client).await?;
    }
    Ok(left)
}

/// Deletes the records of cleanup owed to lost nodes (what a returning node then does
/// is in docs/architecture.md, "Lost nodes"). Returns how many entries were dropped.
pub async fn drop_owed(client: &Client, namespace: &str) -> Result<usize, kube::Error> {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), namespace);
    let mut dropped = 0;
    for cm in api
        .list(&ListParams::default().labels(crate::owed::LABEL))
        .await?
        .items
    {
        let entries = crate::owed::entries(&cm).len();
        let node = crate::owed::node_of(&cm).unwrap_or_default();
        match api.delete(&cm.name_any(), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
        tracing::warn!(%node, entries, "uninstall: cleanup owed to a lost node dropped");
        dropped += entries;
    }
    Ok(dropped)
}

/// Removes the labels the agents put on nodes (`hvx.dev/agent`, `hvx.dev/accelerator`,
/// `hvx.dev/post-copy`).
pub async fn unlabel_nodes(client: &Client) -> Result<usize, kube::Error> {
    use crate::build::{NODE_LABEL_ACCELERATOR, NODE_LABEL_AGENT, NODE_LABEL_POST_COPY};
    let ours = [
        NODE_LABEL_AGENT,
        NODE_LABEL_ACCELERATOR,
        NODE_LABEL_POST_COPY,
    ];
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let nulls: serde_json::Map<String, serde_json::Value> = ours
        .iter()
        .map(|l| (l.to_string(), serde_json::Value::Null))
        .collect();
    let patch = serde_json::json!({"metadata": {"labels": nulls}});
    let mut n = 0;
    for node in nodes.list(&ListParams::default()).await?.items {
        let labels = node.metadata.labels.clone().unwrap_or_default();
        if ours.iter().any(|l| labels.contains_key(*l)) {
            nodes
                .patch(
                    &node.name_any(),
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await?;
            n += 1;
        }
    }
    Ok(n)
}

async fn delete_all<K>(client: &Client) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let all: Api<K> = Api::all(client.clone());
    for obj in all.list(&ListParams::default()).await?.items {
        let api: Api<K> = Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
        match api.delete(&obj.name_any(), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn wait_gone<K>(
    client: &Client,
    deadline: tokio::time::Instant,
) -> Result<Vec<String>, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let all: Api<K> = Api::all(client.clone());
    loop {
        let left: Vec<String> = all
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|o| {
                format!(
                    "{}/{}/{}",
                    K::kind(&()),
                    o.namespace().unwrap_or_default(),
                    o.name_any()
                )
            })
            .collect();
        if left.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(left);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
