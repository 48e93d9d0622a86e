//! VirtualNetwork controller: validates the network, allocates its VNI (stable for the
//! object's life, unique in the cluster), makes every node hosting one of its VMs
//! carry it (the agents' EnsureNetwork; spec changes reach the nodes here) and reports
//! per-node status. The finalizer removes it from every node on deletion.

use crate::context::Context;
use crate::error::Error;
use crate::finalize::Cleanup;
use crate::{hostplan, hostprep};
use hvx_api::{NetworkNodeStatus, VirtualNetwork, condition, new_condition, set_condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

/// Lowest VNI hvx hands out (below are left for static use).
pub const VNI_MIN: u32 = 4096;
/// Highest VNI (24 bits).
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// Picks a free VNI, starting from one derived from the network's UID so that
/// re-creating the operator's state finds the same numbers.
pub fn allocate_vni(uid: &str, used: &BTreeSet<u32>) -> Option<u32> {
    let span = u64::from(VNI_MAX - VNI_MIN + 1);
    let start = hvx_api::launch::fnv1a(uid) % span;
    (0..span)
        .map(|i| VNI_MIN + ((start + i) % span) as u32)
        .find(|v| !used.contains(v))
}

/// Cross-field checks the CRD's CEL does not make: reservations unique and inside the
/// DHCP subnet, subnets not overlapping.
pub fn validate(net: &VirtualNetwork) -> Vec<String> {
    let mut problems = Vec::new();
    let parsed: Vec<(String, Ipv4Addr, u8)> = net
        .spec
        .subnets
        .iter()
        .filter_map(|s| {
            let (ip, len) = s.cidr.split_once('/')?;
            Some((s.name.clone(), ip.parse().ok()?, len.parse().ok()?))
        })
        .collect();
    for (i, (a, aip, alen)) in parsed.iter().enumerate() {
        for (b, bip, blen) in &parsed[i + 1..] {
            let len = (*alen).min(*blen);
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            if u32::from(*aip) & mask == u32::from(*bip) & mask {
                problems.push(format!("subnets {a} and {b} overlap"));
            }
        }
    }
    let mut macs = BTreeSet::new();
    let mut ips = BTreeSet::new();
    for s in &net.spec.subnets {
        for r in s.dhcp.iter().flat_map(|d| d.reservations.iter().flatten()) {
            if !macs.insert(r.mac_address.clone()) {
                problems.push(format!("MAC {} is reserved twice", r.mac_address));
            }
            if !ips.insert(r.ip_address.clone()) {
                problems.push(format!("IP {} is reserved twice", r.ip_address));
            }
            if s.gateway.as_deref() == Some(r.ip_address.as_str()) {
                problems.push(format!(
                    "IP {} is the gateway of subnet {}",
                    r.ip_address, s.name
                ));
            }
        }
    }
    problems
}

/// Whether an application (deleting or not: its VMs may still run) has a NIC on this
/// VirtualNetwork.
pub fn uses_network(app: &hvx_api::VmApplication, network: &str) -> bool {
    crate::vmapp::network_names(app).contains(network)
}

/// Reconciles one VirtualNetwork.
pub async fn reconcile(net: Arc<VirtualNetwork>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = net.namespace().unwrap_or_default();
    let api: Api<VirtualNetwork> = Api::namespaced(ctx.client.clone(), &ns);
    let (ctx, ns) = (&ctx, &ns);
    crate::finalize::reconcile(
        &api,
        net,
        crate::finalize::FirstApply::AfterFinalizer,
        |net| async move { apply(&net, ctx).await },
        |net| async move {
            {
                // VMs still attached keep the network until they are gone.
                let users: Vec<String> = ctx
                    .stores
                    .apps_using_in(ns)
                    .iter()
                    .filter(|a| uses_network(a, &net.name_any()))
                    .map(|a| a.name_any())
                    .collect();
                if let Some(waiting) = Cleanup::wait_for_users(&users) {
                    return Ok(waiting);
                }
                // Lost nodes owe the removal (recorded), Suspect ones make it wait.
                match net.status.as_ref().and_then(|s| s.vni) {
                    Some(vni) => hostprep::delete_network_everywhere(ctx, &net, vni).await,
                    None => Ok(Cleanup::Done),
                }
            }
        },
    )
    .await
}

async fn apply(net: &VirtualNetwork, ctx: &Context) -> Result<Action, Error> {
    let ns = net.namespace().unwrap_or_default();
    let api: Api<VirtualNetwork> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = net.meta().generation;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut status = net.status.clone().unwrap_or_default();

    let problems = validate(net);
    let valid = problems.is_empty();
    set_condition(
        &mut status.conditions,
        new_condition(
            condition::VALID,
            valid,
            if valid { "Valid" } else { "Invalid" },
            problems.join("; "),
            generation,
            now.clone(),
        ),
    );

    if status.vni.is_none() || duplicate_vni(ctx, net).await? {
        let _guard = ctx_vni_lock().lock().await;
        let all: Api<VirtualNetwork> = Api::all(ctx.client.clone());
        let used: BTreeSet<u32> = all
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|n| n.uid() != net.uid())
            .filter_map(|n| n.status.as_ref().and_then(|s| s.vni))
            .collect();
        let uid = net.uid().unwrap_or_default();
        status.vni = Some(allocate_vni(&uid, &used).ok_or(Error::VniExhausted {
            min: VNI_MIN,
            max: VNI_MAX,
        })?);
    }
    set_condition(
        &mut status.conditions,
        new_condition(
            condition::READY,
            valid,
            if valid { "VniAllocated" } else { "Invalid" },
            if valid {
                format!("VNI {}", status.vni.unwrap_or_default())
            } else {
                problems.join("; ")
            },
            generation,
            now,
        ),
    );
    // Program the nodes (a VNI change or a spec change reaches them here; VM
    // placements reach them from the VmApplication controller).
    let mut requeue = Duration::from_secs(60);
    if valid && status.vni.is_some() {
        let mut with_vni = net.clone();
        with_vni.status = Some(status.clone());
        let pods = hostprep::launcher_pods(ctx, &ns).await?;
        let nics = hostplan::placed_nics(&pods);
        let cluster = hostprep::cluster(ctx).await?;
        let synced = hostprep::sync_network(ctx, &with_vni, &nics, &cluster).await;
        // What a node refused (an uplink it lacks, a VNI clash) is the user's to
        // see here, not only in the operator's log.
        let (degraded, reason, message) = match &synced {
            Ok(_) => (false, "NodesProgrammed", String::new()),
            Err(e) => (true, "NodeSyncFailed", e.to_string()),
        };
        set_condition(
            &mut status.conditions,
            new_condition(
                condition::DEGRADED,
                degraded,
                reason,
                message,
                generation,
                Time(k8s_openapi::jiff::Timestamp::now()),
            ),
        );
        match synced {
            Ok(sync) => {
                status.port_count = sync.ports.values().map(|p| p.len() as u32).sum();
                status.nodes = sync
                    .ports
                    .into_iter()
                    .map(|(node, ports)| NetworkNodeStatus {
                        vtep: sync.vteps.get(&node).cloned(),
                        node,
                        ports,
                    })
                    .collect();
            }
            Err(e) => {
                tracing::warn!(network = %net.name_any(), error = %e, "programming nodes");
                requeue = Duration::from_secs(10);
            }
        }
    }
    status.observed_generation = generation;
    let patch =
        json!({"apiVersion": "hvx.dev/v1alpha1", "kind": "VirtualNetwork", "status": status});
    api.patch_status(
        &net.name_any(),
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(Action::requeue(requeue))
}

/// Whether another network already holds this network's VNI and was created first.
async fn duplicate_vni(ctx: &Context, net: &VirtualNetwork) -> Result<bool, Error> {
    let Some(vni) = net.status.as_ref().and_then(|s| s.vni) else {
        return Ok(false);
    };
    let mine = net.creation_timestamp();
    Ok(ctx.stores.networks.state().iter().any(|n| {
        n.uid() != net.uid()
            && n.status.as_ref().and_then(|s| s.vni) == Some(vni)
            && (n.creation_timestamp(), n.uid()) < (mine.clone(), net.uid())
    }))
}

/// One allocation at a time in this process (the operator is leader-elected, so this
/// is one allocation at a time in the cluster).
fn ctx_vni_lock() -> &'static tokio::sync::Mutex<()> {
    static LOCK: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vni_allocation_is_stable_and_skips_used() {
        let none = BTreeSet::new();
        let a = allocate_vni("uid-a", &none).expect("free");
        assert!((VNI_MIN..=VNI_MAX).contains(&a));
        assert_eq!(allocate_vni("uid-a", &none), Some(a), "deterministic");
        let used: BTreeSet<u32> = [a].into();
        let b = allocate_vni("uid-a", &used).expect("free");
        assert_ne!(a, b);
        assert!((VNI_MIN..=VNI_MAX).contains(&b));
    }

    #[test]
    fn overlapping_subnets_and_duplicate_reservations_are_reported() {
        let net: VirtualNetwork = serde_json::from_value(json!({
            "apiVersion": "hvx.dev/v1alpha1", "kind": "VirtualNetwork", "metadata": {"name": "n"},
            "spec": {"subnets": [
                {"name": "a", "cidr": "10.0.0.0/16", "gateway": "10.0.0.1", "dhcp": {"reservations": [
                    {"macAddress": "00:50:56:00:00:01", "ipAddress": "10.0.0.5"},
                    {"macAddress": "00:50:56:00:00:01", "ipAddress": "10.0.0.1"}]}},
                {"name": "b", "cidr": "10.0.3.0/24"}
            ]}
        }))
        .expect("net");
        let problems = validate(&net);
        assert!(
            problems.contains(&"subnets a and b overlap".to_string()),
            "{problems:?}"
        );
        assert!(
            problems.contains(&"MAC 00:50:56:00:00:01 is reserved twice".to_string()),
            "{problems:?}"
        );
        assert!(
            problems.contains(&"IP 10.0.0.1 is the gateway of subnet a".to_string()),
            "{problems:?}"
        );
    }
}
