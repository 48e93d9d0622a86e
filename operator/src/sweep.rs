//! Networks left on nodes that no VirtualNetwork owns any more.
//!
//! Agents persist every network they carry and re-apply them when they start, so that
//! an agent restart never cuts a running VM off. The other side of that: a network
//! whose VirtualNetwork went away while its node was unreachable (or whose finalizer
//! was removed by hand) would come back with every agent restart, holding its bridge,
//! its gateway address and its DHCP server, and clash with a new network reusing the
//! subnet. Every minute (`--orphan-sweep-seconds`) the leader compares what each agent carries
//! (`GetCapabilities.networks`) with the VirtualNetworks that exist and deletes, with
//! `DeleteNetwork`, what it found orphaned twice in a row: a network being created
//! between the list and the agent's answer is never taken for an orphan.

use crate::context::Context;
use crate::hostprep;
use hvx_api::VirtualNetwork;
use hvx_proto::v1 as pb;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use std::collections::BTreeSet;
use std::sync::Arc;

/// A network on a node: (node, network UID, VNI).
pub type Carried = (String, String, u32);

/// The networks to delete now, and the orphans to remember for the next round:
/// `carried` minus those whose UID is in `owned`; deleted are those also orphaned in
/// `previous` (the last round's orphans).
pub fn orphans(
    carried: &[Carried],
    owned: &BTreeSet<String>,
    previous: &BTreeSet<Carried>,
) -> (Vec<Carried>, BTreeSet<Carried>) {
    let now: BTreeSet<Carried> = carried
        .iter()
        .filter(|(_, uid, _)| !owned.contains(uid))
        .cloned()
        .collect();
    let delete = now.intersection(previous).cloned().collect();
    (delete, now)
}

/// Runs forever: one round every `timings.orphan_sweep_seconds`.
pub async fn run(ctx: Arc<Context>) {
    let mut previous = BTreeSet::new();
    loop {
        tokio::time::sleep(crate::context::Timings::secs(
            ctx.config.timings.orphan_sweep_seconds,
        ))
        .await;
        match round(&ctx, &previous).await {
            Ok(next) => previous = next,
            Err(e) => tracing::warn!(error = %e, "network sweep skipped"),
        }
    }
}

async fn round(
    ctx: &Context,
    previous: &BTreeSet<Carried>,
) -> Result<BTreeSet<Carried>, crate::error::Error> {
    let nets: Api<VirtualNetwork> = Api::all(ctx.client.clone());
    // Listed first: a network created after this is not on any agent yet either.
    let owned: BTreeSet<String> = nets
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|n| n.uid())
        .collect();
    let cluster = hostprep::cluster(ctx).await?;
    let mut carried = Vec::new();
    for (node, ip) in &cluster.node_ips {
        // A lost node would only cost a timeout per round; what it carries is its
        // owed cleanup's business (`replay`) once it is back.
        if let crate::liveness::Liveness::Lost(_) = crate::liveness::of_node(ctx, node) {
            continue;
        }
        let client = ctx.agents.client(node, ip, &ctx.metrics)?;
        // An agent that does not answer keeps its networks this round.
        let Ok(caps) = client.get_capabilities(pb::GetCapabilitiesRequest {}).await else {
            continue;
        };
        carried.extend(
            caps.networks
                .into_iter()
                .map(|n| (node.clone(), n.network_uid, n.vni)),
        );
    }
    let (delete, next) = orphans(&carried, &owned, previous);
    for (node, uid, vni) in delete {
        let Ok(client) = hostprep::client_for(ctx, &cluster, &node) else {
            continue;
        };
        let req = pb::DeleteNetworkRequest {
            network_uid: uid.clone(),
            vni,
            force: true,
        };
        match client.delete_network(req.clone()).await {
            Ok(_) => tracing::info!(%node, %uid, vni, "deleted a network no VirtualNetwork owns"),
            Err(e) => tracing::warn!(%node, %uid, vni, error = %e, "deleting an orphaned network"),
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(node: &str, uid: &str, vni: u32) -> Carried {
        (node.into(), uid.into(), vni)
    }

    #[test]
    fn only_twice_orphaned_networks_go() {
        let owned = BTreeSet::from(["live".to_string()]);
        let carried = vec![c("n1", "live", 1), c("n1", "gone", 2), c("n2", "gone", 2)];
        // First sight: remembered, nothing deleted.
        let (delete, seen) = orphans(&carried, &owned, &BTreeSet::new());
        assert!(delete.is_empty());
        assert_eq!(
            seen,
            BTreeSet::from([c("n1", "gone", 2), c("n2", "gone", 2)])
        );
        // Second sight: deleted on both nodes; the owned one never.
        let (delete, _) = orphans(&carried, &owned, &seen);
        assert_eq!(delete, vec![c("n1", "gone", 2), c("n2", "gone", 2)]);
        // A network that became owned in between (created late) stays.
        let owned = BTreeSet::from(["live".to_string(), "gone".to_string()]);
        let (delete, seen) = orphans(&carried, &owned, &seen);
        assert!(delete.is_empty() && seen.is_empty());
    }
}
