//! EnsureNetwork, DeleteNetwork: the overlay switch behind the contract.
//! Each request is the complete desired state of one network on this node; it is
//! persisted (protobuf, `agent/networks/<vni>.pb`) so a restarted agent or a
//! rebooted node re-applies it before the operator calls again. Networks with
//! overlapping (even identical) subnets share a node: each network's gateway,
//! dnsmasq, NAT and firewall live in its own network namespace (`hvx_overlay`).

use super::convert::{network_spec, parse_leases};
use super::error::AgentError;
use super::{Agent, blocking, remove_file, taps, write_atomic};
use hvx_proto::v1 as pb;
use prost::Message;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

fn spec_path(agent: &Agent, vni: u32) -> PathBuf {
    agent
        .paths
        .agent_state()
        .join("networks")
        .join(format!("{vni}.pb"))
}

/// Every persisted network request.
pub fn persisted(agent: &Agent) -> Vec<pb::EnsureNetworkRequest> {
    let dir = agent.paths.agent_state().join("networks");
    let mut out: Vec<pb::EnsureNetworkRequest> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "pb"))
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|b| pb::EnsureNetworkRequest::decode(b.as_slice()).ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|r| r.vni);
    out
}

fn load(agent: &Agent, vni: u32) -> Option<pb::EnsureNetworkRequest> {
    let bytes = std::fs::read(spec_path(agent, vni)).ok()?;
    pb::EnsureNetworkRequest::decode(bytes.as_slice()).ok()
}

/// Taps some persisted network wants.
fn wanted_taps(agent: &Agent) -> BTreeSet<String> {
    persisted(agent)
        .iter()
        .flat_map(|r| r.local_ports.iter().map(|p| p.tap.clone()))
        .collect()
}

/// Leases dnsmasq handed out on network `vni` here.
pub fn leases(agent: &Agent, vni: u32) -> Vec<pb::Lease> {
    let path = agent.switch.host.state_dir(vni).join("leases");
    std::fs::read_to_string(path)
        .map(|t| parse_leases(&t))
        .unwrap_or_default()
}

/// Converges network `req.vni` on this node to `req`.
pub async fn ensure(
    agent: &Arc<Agent>,
    req: pb::EnsureNetworkRequest,
) -> Result<pb::NetworkState, AgentError> {
    let _guard = agent.lock(&format!("net/{}", req.vni)).await;
    apply_locked(agent, req).await
}

async fn apply_locked(
    agent: &Arc<Agent>,
    req: pb::EnsureNetworkRequest,
) -> Result<pb::NetworkState, AgentError> {
    let mut spec = agent.config.with_egress_policy(network_spec(
        &req,
        agent.config.node_ip,
        agent.config.underlay_mtu,
    )?);
    if req.mtu > 0 {
        // The guest MTU the user asked for caps what the underlay allows.
        spec.underlay_mtu = spec.underlay_mtu.min(req.mtu + 50);
    }
    // Persist first: if applying fails half-way, a restart still converges to it.
    write_atomic(&spec_path(agent, req.vni), &req.encode_to_vec())?;
    let ports: Vec<String> = req.local_ports.iter().map(|p| p.tap.clone()).collect();
    let a = agent.clone();
    let report = blocking(move || {
        for t in &ports {
            taps::ensure(t)?;
        }
        let report = a.switch.apply(&spec)?;
        taps::remove_unwanted(&wanted_taps(&a), &BTreeSet::new());
        Ok(report)
    })
    .await?;
    if !report.missing_ports.is_empty() {
        return Err(AgentError::Precondition(format!(
            "ports missing after creating them: {}",
            report.missing_ports.join(", ")
        )));
    }
    Ok(pb::NetworkState {
        bridge: hvx_overlay::names::bridge(req.vni),
        vxlan: hvx_overlay::names::vxlan(req.vni),
        mtu: req.mtu,
        local_ports: req.local_ports.len() as u32,
        remote_vteps: req.remote_vteps.len() as u32,
        leases: leases(agent, req.vni),
    })
}

/// Removes network `vni` from this node.
pub async fn delete(agent: &Arc<Agent>, vni: u32, force: bool) -> Result<(), AgentError> {
    let _guard = agent.lock(&format!("net/{vni}")).await;
    let mine: BTreeSet<String> = load(agent, vni)
        .map(|r| r.local_ports.iter().map(|p| p.tap.clone()).collect())
        .unwrap_or_default();
    let in_use: Vec<&String> = mine.iter().filter(|t| taps::in_use(t)).collect();
    if !force && !in_use.is_empty() {
        return Err(AgentError::Precondition(format!(
            "VMs are attached to network {vni} here ({}); stop them or force",
            in_use
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    remove_file(&spec_path(agent, vni))?;
    let a = agent.clone();
    blocking(move || {
        a.switch.teardown(vni)?;
        taps::remove_unwanted(&wanted_taps(&a), &mine);
        Ok(())
    })
    .await
}

/// Re-applies every persisted network (agent start).
pub async fn restore(agent: &Arc<Agent>) -> Result<usize, AgentError> {
    let reqs = persisted(agent);
    let mut specs = Vec::new();
    for r in &reqs {
        match network_spec(r, agent.config.node_ip, agent.config.underlay_mtu) {
            Ok(s) => specs.push(agent.config.with_egress_policy(s)),
            Err(e) => tracing::warn!(vni = r.vni, error = %e, "persisted network unusable"),
        }
    }
    let ports: Vec<String> = reqs
        .iter()
        .flat_map(|r| r.local_ports.iter().map(|p| p.tap.clone()))
        .collect();
    let a = agent.clone();
    let n = specs.len();
    blocking(move || {
        for t in &ports {
            taps::ensure(t)?;
        }
        let (_, errors) = a.switch.reconcile_all(&specs);
        for e in errors {
            tracing::warn!(error = %e, "restoring a network");
        }
        taps::remove_unwanted(&wanted_taps(&a), &BTreeSet::new());
        Ok(())
    })
    .await?;
    Ok(n)
}
