//! Cleanup owed to lost nodes, done when they return (`hvx_operator_core::owed` keeps
//! the records). Every few seconds the leader looks at every agent node (which also
//! keeps its liveness observations fresh and announces a loss with NodeLost) and at
//! every record: a node whose agent is Alive again gets its owed calls replayed through
//! the typed agent client, each entry removed once done and the record deleted when
//! empty; a node whose Node object was deleted has its record dropped (nothing of hvx
//! can run there any more; a machine that rejoins under that name is a new node, and
//! its agent keeps only what its start-up restores, see docs/architecture.md); a node
//! that is Lost or merely Suspect keeps its record untouched.

use crate::agents::AgentClient;
use crate::context::Context;
use crate::error::Error;
use crate::hostprep;
use crate::liveness::{self, Liveness};
use crate::owed::{self, OwedCall};
use hvx_proto::v1 as pb;
use kube::ResourceExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// What one round did with one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every entry was replayed and the record deleted.
    Replayed(usize),
    /// Some entries were replayed (removed), the others failed and stay.
    Partly {
        /// Replayed and removed.
        done: usize,
        /// Still owed.
        left: usize,
    },
    /// The Node object is gone: the record was dropped.
    Dropped(usize),
    /// The node is not back (Lost or Suspect): kept as it is.
    Kept(usize),
}

/// Runs forever: one round every `interval`, once the caches hold their first lists
/// (an empty node cache would read as "every Node deleted").
pub async fn run(ctx: Arc<Context>, interval: Duration) {
    if let Err(e) = ctx.stores.wait_until_ready().await {
        tracing::error!(error = %e, "a watch ended before its first list; owed cleanup not replayed");
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(interval).await;
        if let Err(e) = round(&ctx).await {
            tracing::warn!(error = %e, "owed cleanup round skipped");
        }
    }
}

/// One round over every agent node and every record; the outcome per node.
pub async fn round(ctx: &Context) -> Result<BTreeMap<String, Outcome>, Error> {
    // Looking at every agent node keeps the observations timed (a loss is then seen
    // at the same pace whether or not anything is being deleted) and announces losses.
    for node in ctx.stores.agent_nodes().keys() {
        if let Liveness::Lost(why) = liveness::of_node(ctx, node) {
            hostprep::announce_lost(ctx, node, &why).await;
        }
    }
    let mut outcomes = BTreeMap::new();
    let mut owed_by_node = BTreeMap::new();
    for cm in owed::list(ctx).await? {
        let name = cm.name_any();
        let Some(node) = owed::node_of(&cm) else {
            tracing::warn!(record = %name, "owed cleanup record without its node annotation; left alone");
            continue;
        };
        let entries = owed::entries(&cm);
        if ctx.stores.node(&node).is_none() && node_deleted(ctx, &node).await? {
            if owed::delete(ctx, &name, cm.resource_version()).await? {
                tracing::info!(%node, entries = entries.len(), "Node deleted: its owed cleanup is dropped");
                outcomes.insert(node, Outcome::Dropped(entries.len()));
            }
            continue;
        }
        let client = match liveness::of_node(ctx, &node) {
            Liveness::Alive => hostprep::cluster(ctx)
                .await
                .and_then(|c| hostprep::client_for(ctx, &c, &node)),
            Liveness::Lost(_) | Liveness::Suspect(_) => {
                owed_by_node.insert(node.clone(), entries.len() as u64);
                outcomes.insert(node, Outcome::Kept(entries.len()));
                continue;
            }
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                // Its lease is back but not its ready label yet: next round.
                tracing::debug!(%node, error = %e, "owed cleanup waits for the agent");
                owed_by_node.insert(node.clone(), entries.len() as u64);
                outcomes.insert(node, Outcome::Kept(entries.len()));
                continue;
            }
        };
        let mut done = Vec::new();
        let mut left = 0usize;
        for (key, entry) in &entries {
            let entry = match entry {
                Ok(e) => e,
                Err(why) => {
                    tracing::warn!(record = %name, %key, %why, "unreadable owed cleanup entry; left for a person");
                    left += 1;
                    continue;
                }
            };
            match replay(&client, &entry.call).await {
                Ok(()) => {
                    tracing::info!(%node, object = %entry.object, call = ?entry.call, "owed cleanup done");
                    done.push(key.clone());
                }
                Err(e) => {
                    tracing::warn!(%node, object = %entry.object, error = %e, "owed cleanup failed; retried next round");
                    left += 1;
                }
            }
        }
        let outcome = if left == 0 && owed::delete(ctx, &name, cm.resource_version()).await? {
            Outcome::Replayed(done.len())
        } else {
            // Failures stay, and so does anything recorded since the list.
            owed::forget(ctx, &name, &done).await?;
            owed_by_node.insert(node.clone(), left as u64);
            Outcome::Partly {
                done: done.len(),
                left,
            }
        };
        outcomes.insert(node, outcome);
    }
    ctx.metrics.owed(owed_by_node);
    Ok(outcomes)
}

/// Whether the API server has no Node `node` either (the cache may lag behind a Node
/// just re-created): owed work is dropped only on its word.
async fn node_deleted(ctx: &Context, node: &str) -> Result<bool, Error> {
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(ctx.client.clone());
    let found = nodes
        .list(&kube::api::ListParams::default().fields(&format!("metadata.name={node}")))
        .await?;
    Ok(found.items.is_empty())
}

/// Replays one owed call on the node's agent.
pub async fn replay(client: &AgentClient, call: &OwedCall) -> Result<(), Error> {
    match call {
        OwedCall::DeleteNetwork { network_uid, vni } => {
            // The agent deletes by VNI; only the network it carries under this UID is
            // the deleted one (a newer network may hold the VNI there now).
            let caps = client
                .get_capabilities(pb::GetCapabilitiesRequest {})
                .await?;
            let carried = caps
                .networks
                .iter()
                .any(|n| n.network_uid == *network_uid && n.vni == *vni);
            if carried {
                client
                    .delete_network(pb::DeleteNetworkRequest {
                        network_uid: network_uid.clone(),
                        vni: *vni,
                        force: true,
                    })
                    .await?;
            }
            Ok(())
        }
        OwedCall::ReleaseDisk { disk_uid } => client
            .release_disk(pb::ReleaseDiskRequest {
                disk_uid: disk_uid.clone(),
            })
            .await
            .map(|_| ()),
        OwedCall::DeleteOverlay { vm_uid, disk_name } => {
            hostprep::delete_vm_overlays_on(client, vm_uid, std::slice::from_ref(disk_name)).await
        }
    }
}
