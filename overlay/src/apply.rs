//! The applier: diffs a [`NetworkPlan`] against the kernel and changes only the
//! difference. Running it twice changes nothing; after an agent restart it finds
//! everything by name (links, the gateway namespace, the transit pair, dnsmasq)
//! and leaves working links alone (no flap, no traffic cut).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::addr::Mac;
use crate::daemon::{self, DaemonAction};
use crate::dnsmasq::DnsmasqPaths;
use crate::error::{OverlayError, Result};
use crate::host::{self, Host, run};
use crate::names::{self, OwnedLink, VXLAN_PORT};
use crate::nft::marker_chain;
use crate::observe::{self, LinkState};
use crate::pin;
use crate::plan::{NetworkPlan, build_plan, needs_transit};
use crate::spec::{ExternalL2, NetworkSpec};
use crate::transit;

/// Where named network namespaces live (`ip netns`).
const NETNS_DIR: &str = "/run/netns";

/// What one apply changed: the commands it ran (empty = already converged) and
/// ports that are not there yet (the VM pod has not plugged its link in).
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    pub vni: u32,
    pub changes: Vec<String>,
    pub missing_ports: Vec<String>,
    /// Time from the start of the apply until the FDB changes were in the kernel
    /// (the moment a MAC move takes effect on this node); None if the FDB was right.
    pub fdb_programmed_after: Option<Duration>,
    /// Whether only FDB/neighbour entries were diffed (membership-only change).
    pub fast_path: bool,
}

fn joined<T>(r: std::thread::Result<Result<T>>) -> Result<T> {
    r.unwrap_or_else(|_| {
        Err(OverlayError::Spawn {
            program: "observer thread".into(),
            source: std::io::Error::other("panicked"),
        })
    })
}

fn or_empty<T: Default>(exists: bool, r: Result<T>) -> Result<T> {
    if exists { r } else { Ok(T::default()) }
}

/// Kernel state relevant to one network.
struct Observed {
    links: BTreeMap<String, LinkState>,
    /// None when not read (trusted from the previous apply).
    chains: Option<Vec<observe::ChainId>>,
    fdb: observe::FdbState,
    addrs: BTreeMap<String, BTreeSet<crate::addr::Ipv4Net>>,
}

/// Kernel state inside a network's gateway namespace.
#[derive(Debug, Default)]
pub struct ObservedNs {
    pub links: BTreeMap<String, LinkState>,
    pub addrs: BTreeMap<String, BTreeSet<crate::addr::Ipv4Net>>,
    pub routes: Vec<observe::Route>,
    pub neigh: BTreeSet<(std::net::Ipv4Addr, Mac)>,
}

/// The overlay switch of one node.
#[derive(Debug, Clone)]
pub struct Switch {
    pub host: Host,
    /// Plans this process applied successfully. Only a cache: a restarted agent
    /// starts empty and does a full diff; it enables the membership fast path.
    applied: Arc<Mutex<BTreeMap<u32, NetworkPlan>>>,
    /// Transit slots handed out by this process (VNI -> slot), so two networks
    /// applied at once never pick the same free slot before either has its link.
    transit_slots: Arc<Mutex<BTreeMap<u32, u32>>>,
}

/// True when two plans differ at most in FDB and neighbour entries (a VM moved
/// between two other nodes, or a remote VM came or went).
fn membership_only_change(old: &NetworkPlan, new: &NetworkPlan) -> bool {
    let strip = |p: &NetworkPlan| {
        let mut p = p.clone();
        p.vxlan_fdb.clear();
        p.bridge_fdb.clear();
        p.neighbours.clear();
        p.dnsmasq = None;
        p
    };
    // dnsmasq's side files may change (names); its main file must not.
    let same_main = old.dnsmasq.as_ref().map(|d| &d.main) == new.dnsmasq.as_ref().map(|d| &d.main);
    same_main && strip(old) == strip(new)
}

impl Switch {
    pub fn new(host: Host) -> Self {
        Switch {
            host,
            applied: Arc::default(),
            transit_slots: Arc::default(),
        }
    }

    fn remember(&self, plan: Option<&NetworkPlan>, vni: u32) {
        let mut applied = self
            .applied
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match plan {
            Some(p) => applied.insert(vni, p.clone()),
            None => applied.remove(&vni),
        };
    }

    fn last_applied(&self, vni: u32) -> Option<NetworkPlan> {
        let applied = self
            .applied
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        applied.get(&vni).cloned()
    }

    pub fn plan(&self, spec: &NetworkSpec) -> Result<NetworkPlan> {
        spec.validate()?;
        let slot = if needs_transit(spec) {
            Some(self.transit_slot(spec)?)
        } else {
            None
        };
        build_plan(spec, &self.host, slot)
    }

    /// The network's transit slot on this node: the one it holds (read back from
    /// its `hvu<vni>` address, or handed out earlier by this process), else a free
    /// one. Allocation and reservation happen under one lock.
    fn transit_slot(&self, spec: &NetworkSpec) -> Result<u32> {
        let vni = spec.vni;
        let mut reserved = self
            .transit_slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut current = reserved.get(&vni).copied();
        let mut taken: BTreeSet<u32> = reserved
            .iter()
            .filter(|(v, _)| **v != vni)
            .map(|(_, s)| *s)
            .collect();
        for (ifname, nets) in observe::all_addresses(&self.host)? {
            let Some(OwnedLink::TransitVeth(owner)) = names::parse_owned_link(&ifname) else {
                continue;
            };
            for slot in nets
                .iter()
                .filter_map(|n| transit::slot_of_node_address(n.addr))
            {
                if owner == vni {
                    current = current.or(Some(slot));
                } else {
                    taken.insert(slot);
                }
            }
        }
        let slot =
            transit::allocate(vni, current, &taken).ok_or_else(|| OverlayError::InvalidSpec {
                network: spec.name.clone(),
                reason: format!(
                    "no free transit address pair on this node ({} networks need one)",
                    transit::TRANSIT_SLOTS
                ),
            })?;
        reserved.insert(vni, slot);
        Ok(slot)
    }

    fn release_transit_slot(&self, vni: u32) {
        self.transit_slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&vni);
    }

    /// Converges one network to `spec`. When the previous apply of this process
    /// differs only in membership locations, only the FDB and neighbour tables are
    /// read and changed (the MAC-move path); otherwise everything is diffed.
    pub fn apply(&self, spec: &NetworkSpec) -> Result<ApplyReport> {
        let plan = self.plan(spec)?;
        let result = match self.last_applied(plan.vni) {
            Some(old) if membership_only_change(&old, &plan) => self.apply_membership(&plan),
            Some(old) => self.apply_full(&plan, Some(&old)),
            None => self.apply_full(&plan, None),
        };
        if result.is_err() {
            // Whatever half-happened, the next apply diffs everything.
            self.remember(None, plan.vni);
        }
        result
    }

    fn apply_membership(&self, plan: &NetworkPlan) -> Result<ApplyReport> {
        let started = Instant::now();
        let mut report = ApplyReport {
            vni: plan.vni,
            fast_path: true,
            ..Default::default()
        };
        let ports: BTreeSet<&str> = plan.ports.iter().map(String::as_str).collect();
        let fdb = observe::fdb(&self.host, &plan.bridge, &plan.vxlan)?;
        let cmds = fdb_commands(plan, &fdb, &ports);
        self.bridge_batch(&cmds, &mut report)?;
        if !cmds.is_empty() {
            report.fdb_programmed_after = Some(started.elapsed());
        }
        let ns = Host::in_netns(plan.netns.clone(), self.host.state_root.clone());
        let neigh = observe::neighbours(&ns, names::NS_GATEWAY_IF)?;
        let cmds = neigh_commands(plan, &neigh);
        ip_batch(&ns, &cmds, &mut report)?;
        if let Some(cfg) = &plan.dnsmasq
            && daemon::ensure(&ns, &plan.name, cfg)? != DaemonAction::Unchanged
        {
            report.changes.push("dnsmasq reloaded".into());
        }
        self.remember(Some(plan), plan.vni);
        Ok(report)
    }

    /// Full diff of everything the plan covers (startup, resync, config changes).
    pub fn apply_plan(&self, plan: &NetworkPlan) -> Result<ApplyReport> {
        self.apply_full(plan, None)
    }

    /// Diffs links, FDB, neighbours and addresses against the kernel. With
    /// `previous` (what this process applied last), nft tables and the forwarding
    /// sysctl are trusted to be as applied, which saves reads on the MAC-move path;
    /// the periodic [`Switch::reconcile_all`] verifies everything.
    fn apply_full(
        &self,
        plan: &NetworkPlan,
        previous: Option<&NetworkPlan>,
    ) -> Result<ApplyReport> {
        let started = Instant::now();
        let mut report = ApplyReport {
            vni: plan.vni,
            ..Default::default()
        };
        let ns = Host::in_netns(plan.netns.clone(), self.host.state_root.clone());
        // The namespace first: the veths are created with their inner end in it.
        self.ensure_netns(plan, &mut report)?;
        // Every read runs at once (each is a process start); a MAC move waits on them.
        let mut seen = self.observe_all(plan, previous.is_none())?;
        // Rules first: they match ports by name, so a port never forwards a frame
        // before its firewall and gateway isolation are in place.
        match (&seen.chains, previous) {
            (Some(chains), _) => self.apply_nft(plan, chains, &mut report)?,
            (None, Some(prev)) if prev.nft_hash == plan.nft_hash => {}
            (None, _) => self.apply_nft(plan, &[], &mut report)?,
        }
        check_external(plan, &seen.links, &seen.addrs)?;
        let (link_cmds, missing) = link_commands(plan, &seen.links);
        report.missing_ports = missing;
        self.ip_batch(&link_cmds, &mut report)?;
        if link_cmds.iter().any(|c| c.starts_with("link add")) {
            // A (re)created device starts empty: what was read before is stale.
            seen.fdb = observe::fdb(&self.host, &plan.bridge, &plan.vxlan)?;
            seen.addrs = observe::all_addresses(&self.host)?;
        }

        // FDB right after the links: this is the step a MAC move waits for.
        let present_ports: BTreeSet<&str> = plan
            .ports
            .iter()
            .filter(|p| !report.missing_ports.contains(p))
            .map(String::as_str)
            .collect();
        let fdb_cmds = fdb_commands(plan, &seen.fdb, &present_ports);
        self.bridge_batch(&fdb_cmds, &mut report)?;
        if !fdb_cmds.is_empty() {
            report.fdb_programmed_after = Some(started.elapsed());
        }

        let l3_cmds = node_l3_commands(plan, &seen.addrs);
        self.ip_batch(&l3_cmds, &mut report)?;

        // The gateway's rules before its interface comes up (below).
        let ns_chains = if previous.is_some_and(|p| p.ns_nft_hash == plan.ns_nft_hash) {
            None
        } else {
            Some(observe::nft_chains(&ns)?)
        };
        if let Some(chains) = ns_chains {
            let marker = marker_chain(&plan.ns_nft_hash);
            let table = names::gw_table(plan.vni);
            if !chains
                .iter()
                .any(|(f, t, c)| f == "ip" && *t == table && *c == marker)
            {
                run(
                    &ns.exec_argv("nft", &["-f", "-"]),
                    Some(&plan.ns_nft_script),
                )?;
                report.changes.push(format!(
                    "nft replace gateway table of vni {} ({})",
                    plan.vni, plan.ns_nft_hash
                ));
            }
        }
        // Inside the namespace: the gateway, the transit end, routes, neighbours.
        let ns_seen = observe_ns(&ns)?;
        if plan.needs_forwarding && !previous.is_some_and(|p| p.needs_forwarding) {
            enable_forwarding(&ns, &mut report)?;
        }
        self.connect_peers(plan, &ns, &ns_seen, &mut report)?;
        let ns_seen = if report.changes.iter().any(|c| c.contains("link add rp")) {
            observe_ns(&ns)?
        } else {
            ns_seen
        };
        let ns_cmds = ns_commands(plan, &ns_seen);
        ip_batch(&ns, &ns_cmds, &mut report)?;
        for (peer, _) in &plan.peer_routes {
            // Answers ARP for this network's hosts on the peer link, so the peer's
            // route needs no next-hop address.
            let link = names::peer_link(*peer);
            if ns_seen.links.contains_key(&link) {
                let key = format!("net.ipv4.conf.{link}.proxy_arp");
                let cur = run(&ns.exec_argv("sysctl", &["-n", &key]), None)?;
                if cur.trim() != "1" {
                    run(&ns.exec_argv("sysctl", &["-qw", &format!("{key}=1")]), None)?;
                    report.changes.push(format!("sysctl {key}=1"));
                }
            }
        }

        if plan.node_forwarding && !previous.is_some_and(|p| p.node_forwarding) {
            enable_forwarding(&self.host, &mut report)?;
        }

        if let Some(cfg) = &plan.dnsmasq {
            match daemon::ensure(&ns, &plan.name, cfg)? {
                DaemonAction::Unchanged => {}
                other => report.changes.push(format!("dnsmasq {other:?}")),
            }
        } else {
            daemon::stop(&DnsmasqPaths::new(&plan.state_dir))?;
        }
        if !report.changes.is_empty() {
            tracing::info!(
                vni = plan.vni,
                changes = report.changes.len(),
                "overlay network converged"
            );
        }
        // Ports that are not there yet keep the next apply on the full path.
        if report.missing_ports.is_empty() {
            self.remember(Some(plan), plan.vni);
        } else {
            self.remember(None, plan.vni);
        }
        Ok(report)
    }

    /// Makes sure the network's gateway namespace exists under its name, and is
    /// pinned ([`pin`]). A named one is adopted (a re-apply, a restarted agent
    /// process in the same mount namespace). A name whose mount is gone (the agent's
    /// mount namespace died, as with a container or `ip netns exec`) is bound again
    /// to the namespace its pin holds, or else to the one its dnsmasq still serves,
    /// so the gateway and its NAT state are kept; with neither, it is made afresh.
    fn ensure_netns(&self, plan: &NetworkPlan, report: &mut ApplyReport) -> Result<()> {
        let dir = std::path::Path::new(NETNS_DIR);
        let path = dir.join(&plan.netns);
        if !is_netns_mount(&path) {
            self.name_netns(plan, &path, report)?;
        }
        let pin_at = pin_of(&plan.state_dir);
        let host_pid = self.host.pin_host_pid;
        if pin::possible(host_pid) && !pin::pinned(host_pid, &pin_at, &path) {
            match pin::pin(host_pid, &pin_at, &path) {
                Ok(()) => {
                    report
                        .changes
                        .push(format!("pinned {} at {}", plan.netns, pin_at.display()))
                }
                Err(e) => {
                    tracing::warn!(netns = %plan.netns, error = %e, "gateway namespace not pinned: it lives only as long as this agent's mount namespace")
                }
            }
        }
        Ok(())
    }

    fn name_netns(
        &self,
        plan: &NetworkPlan,
        path: &std::path::Path,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let path = path.to_path_buf();
        let pin_at = pin_of(&plan.state_dir);
        if is_netns_mount(&pin_at) {
            // This container's copy of the host's pin: the namespace of an agent
            // before this one.
            let target = bind_name(&path, &pin_at.display().to_string())?;
            report
                .changes
                .push(format!("re-attached {target} from its pin"));
            return Ok(());
        }
        let dnsmasq = daemon::running(&DnsmasqPaths::new(&plan.state_dir));
        if let Some(id) = dnsmasq {
            let target = bind_name(&path, &format!("/proc/{}/ns/net", id.pid))?;
            report
                .changes
                .push(format!("re-attached {target} from dnsmasq {}", id.pid));
            return Ok(());
        }
        if path.exists() {
            // An empty name of a namespace that is gone: `ip netns add` refuses it.
            std::fs::remove_file(&path).map_err(|source| OverlayError::WriteFile {
                path: path.clone(),
                source,
            })?;
        }
        run(
            &[
                "ip".into(),
                "netns".into(),
                "add".into(),
                plan.netns.clone(),
            ],
            None,
        )?;
        report.changes.push(format!("ip netns add {}", plan.netns));
        Ok(())
    }

    /// Joins this network's namespace to each routed peer's whose namespace exists
    /// on this node (one veth pair `rp<peer>` / `rp<self>`), and removes links to
    /// networks no longer peered. Deleting either namespace deletes the pair.
    fn connect_peers(
        &self,
        plan: &NetworkPlan,
        ns: &Host,
        seen: &ObservedNs,
        report: &mut ApplyReport,
    ) -> Result<()> {
        let wanted: BTreeSet<String> = plan
            .peer_routes
            .iter()
            .map(|(v, _)| names::peer_link(*v))
            .collect();
        let mut cmds = Vec::new();
        for name in seen.links.keys() {
            if name.starts_with("rp") && !wanted.contains(name) {
                cmds.push(format!("link del dev {name}"));
            }
        }
        ip_batch(ns, &cmds, report)?;
        for (peer, _) in &plan.peer_routes {
            let link = names::peer_link(*peer);
            let peer_ns = self.host.gateway_netns(*peer);
            if seen.links.contains_key(&link)
                || !std::path::Path::new(NETNS_DIR).join(&peer_ns).exists()
            {
                continue;
            }
            let back = names::peer_link(plan.vni);
            run(
                &ns.ip_argv(&[
                    "link", "add", &link, "type", "veth", "peer", "name", &back, "netns", &peer_ns,
                ]),
                None,
            )?;
            let peer_host = Host::in_netns(peer_ns, self.host.state_root.clone());
            run(&peer_host.ip_argv(&["link", "set", &back, "up"]), None)?;
            report
                .changes
                .push(format!("ip link add {link} (peer {back})"));
        }
        Ok(())
    }

    fn ip_batch(&self, cmds: &[String], report: &mut ApplyReport) -> Result<()> {
        ip_batch(&self.host, cmds, report)
    }

    fn bridge_batch(&self, cmds: &[String], report: &mut ApplyReport) -> Result<()> {
        if cmds.is_empty() {
            return Ok(());
        }
        run(
            &self.host.bridge_argv(&["-batch", "-"]),
            Some(&(cmds.join("\n") + "\n")),
        )?;
        report
            .changes
            .extend(cmds.iter().map(|c| format!("bridge {c}")));
        Ok(())
    }

    /// Reads links, nft chains, FDB and addresses concurrently. The FDB read fails
    /// when the bridge does not exist yet; then it is empty.
    fn observe_all(&self, plan: &NetworkPlan, read_nft: bool) -> Result<Observed> {
        let (links, chains, fdb, addrs) = std::thread::scope(|s| {
            let links = s.spawn(|| observe::links(&self.host));
            let chains = s.spawn(|| {
                if read_nft {
                    observe::nft_chains(&self.host).map(Some)
                } else {
                    Ok(None)
                }
            });
            let fdb = s.spawn(|| observe::fdb(&self.host, &plan.bridge, &plan.vxlan));
            let addrs = s.spawn(|| observe::all_addresses(&self.host));
            (
                joined(links.join()),
                joined(chains.join()),
                joined(fdb.join()),
                joined(addrs.join()),
            )
        });
        let links: BTreeMap<String, LinkState> =
            links?.into_iter().map(|l| (l.name.clone(), l)).collect();
        let bridge_exists = links.contains_key(&plan.bridge);
        Ok(Observed {
            chains: chains?,
            fdb: or_empty(bridge_exists, fdb)?,
            addrs: addrs?,
            links,
        })
    }

    fn apply_nft(
        &self,
        plan: &NetworkPlan,
        chains: &[observe::ChainId],
        report: &mut ApplyReport,
    ) -> Result<()> {
        let marker = marker_chain(&plan.nft_hash);
        let has = |family: &str, table: &str| {
            chains
                .iter()
                .any(|(f, t, c)| f == family && *t == table && *c == marker)
        };
        let fw_ok = has("bridge", &names::fw_table(plan.vni));
        let rt_name = names::rt_table(plan.vni);
        let rt_ok = if plan.has_rt_table {
            has("ip", &rt_name)
        } else {
            !chains.iter().any(|(f, t, _)| f == "ip" && *t == rt_name)
        };
        if fw_ok && rt_ok {
            return Ok(());
        }
        run(
            &self.host.exec_argv("nft", &["-f", "-"]),
            Some(&plan.nft_script),
        )?;
        report.changes.push(format!(
            "nft replace tables of vni {} ({})",
            plan.vni, plan.nft_hash
        ));
        Ok(())
    }

    /// Removes every trace of a network: dnsmasq, its gateway namespace (with the
    /// namespace, its veths and peer links go), links (ports are released, not
    /// deleted: they belong to the VM pods), nft tables, state files. Absent things
    /// count as removed; every step runs even if an earlier one failed.
    pub fn teardown(&self, vni: u32) -> Result<()> {
        self.remember(None, vni);
        self.release_transit_slot(vni);
        let mut errors: Vec<String> = Vec::new();
        let dir = self.host.state_dir(vni);
        if let Err(e) = daemon::stop(&DnsmasqPaths::new(&dir)) {
            errors.push(e.to_string());
        }
        // Links before the namespace: deleting a veth deletes its peer at once,
        // while a deleted namespace frees its devices later (asynchronously).
        match observe::links(&self.host) {
            Ok(links) => {
                for name in [
                    names::vxlan(vni),
                    names::bridge(vni),
                    names::gateway_veth(vni),
                    names::transit_veth(vni),
                    names::vlan_uplink(vni),
                    names::external_vxlan(vni),
                ] {
                    if links.iter().any(|l| l.name == name)
                        && let Err(e) = run(&self.host.ip_argv(&["link", "del", &name]), None)
                        && !gone_meanwhile(&e)
                    {
                        errors.push(e.to_string());
                    }
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
        let netns = self.host.gateway_netns(vni);
        if std::path::Path::new(NETNS_DIR).join(&netns).exists() {
            // Nothing but hvx's dnsmasq runs in there; whatever still does (a stray
            // of a crashed agent) would keep the namespace alive unnamed.
            if let Ok(pids) = run(
                &["ip".into(), "netns".into(), "pids".into(), netns.clone()],
                None,
            ) {
                for pid in pids.split_whitespace() {
                    let _ = run(&["kill".into(), "-KILL".into(), pid.into()], None);
                }
            }
            if let Err(e) = run(&["ip".into(), "netns".into(), "del".into(), netns], None) {
                errors.push(e.to_string());
            }
        }
        match observe::nft_tables(&self.host) {
            Ok(tables) => {
                for (family, name) in tables {
                    if names::parse_owned_table(&name) == Some(vni) {
                        let argv = self
                            .host
                            .exec_argv("nft", &["delete", "table", &family, &name]);
                        if let Err(e) = run(&argv, None) {
                            errors.push(e.to_string());
                        }
                    }
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
        pin::unpin(self.host.pin_host_pid, &pin_of(&dir));
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            errors.push(format!("remove {}: {e}", dir.display()));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(OverlayError::Teardown {
                what: format!("vni {vni}"),
                count: errors.len(),
                messages: errors.join("; "),
            })
        }
    }

    /// VNIs that have any kernel object or state directory of ours on this node.
    pub fn owned_vnis(&self) -> Result<BTreeSet<u32>> {
        let mut vnis = BTreeSet::new();
        for l in observe::links(&self.host)? {
            match names::parse_owned_link(&l.name) {
                Some(
                    OwnedLink::Bridge(v)
                    | OwnedLink::Vxlan(v)
                    | OwnedLink::GatewayVeth(v)
                    | OwnedLink::TransitVeth(v)
                    | OwnedLink::VlanUplink(v)
                    | OwnedLink::ExternalVxlan(v),
                ) => {
                    vnis.insert(v);
                }
                None => {}
            }
        }
        if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
            for e in entries.flatten() {
                if let Some(name) = e.file_name().to_str() {
                    vnis.extend(names::parse_gateway_netns(
                        &self.host.gateway_netns_prefix,
                        name,
                    ));
                }
            }
        }
        for (_, name) in observe::nft_tables(&self.host)? {
            vnis.extend(names::parse_owned_table(&name));
        }
        if let Ok(entries) = std::fs::read_dir(&self.host.state_root) {
            for e in entries.flatten() {
                if let Some(v) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                    vnis.insert(v);
                }
            }
        }
        Ok(vnis)
    }

    /// Rotates every network's dnsmasq log that outgrew its cap (the agent calls this
    /// periodically: between applies dnsmasq keeps writing).
    pub fn cap_logs(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.host.state_root) {
            for e in entries.flatten() {
                if e.file_name()
                    .to_str()
                    .is_some_and(|s| s.parse::<u32>().is_ok())
                {
                    daemon::cap_log(&DnsmasqPaths::new(&e.path()));
                }
            }
        }
    }

    /// The agent's startup and periodic resync: converge every wanted network, then
    /// remove networks that are no longer wanted. Errors of one network do not stop
    /// the others; they are all returned.
    pub fn reconcile_all(&self, specs: &[NetworkSpec]) -> (Vec<ApplyReport>, Vec<OverlayError>) {
        let mut reports = Vec::new();
        let mut errors = Vec::new();
        for s in specs {
            match self.plan(s).and_then(|p| self.apply_plan(&p)) {
                Ok(r) => reports.push(r),
                Err(e) => errors.push(e),
            }
        }
        let wanted: BTreeSet<u32> = specs.iter().map(|s| s.vni).collect();
        match self.owned_vnis() {
            Ok(owned) => {
                for vni in owned.difference(&wanted) {
                    if let Err(e) = self.teardown(*vni) {
                        errors.push(e);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        (reports, errors)
    }
}

/// A `link del` that failed because the device went meanwhile (a veth whose
/// peer's namespace was just freed) did what it was asked.
/// Names the namespace at `source` (a namespace file) `path` under `/run/netns`;
/// returns the name's path as text.
fn bind_name(path: &std::path::Path, source: &str) -> Result<String> {
    let dir = std::path::Path::new(NETNS_DIR);
    std::fs::create_dir_all(dir).map_err(|source| OverlayError::WriteFile {
        path: dir.to_path_buf(),
        source,
    })?;
    if !path.exists() {
        host::write_file(path, "")?;
    }
    let target = path.display().to_string();
    run(
        &[
            "mount".into(),
            "--bind".into(),
            source.to_string(),
            target.clone(),
        ],
        None,
    )?;
    Ok(target)
}

/// The pin of the gateway namespace whose network keeps its state in `state_dir`
/// (absolute: the host resolves it from its own root).
fn pin_of(state_dir: &std::path::Path) -> std::path::PathBuf {
    pin::pin_path(&std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf()))
}

fn gone_meanwhile(e: &OverlayError) -> bool {
    matches!(e, OverlayError::CommandFailed { stderr, .. } if stderr.contains("Cannot find device"))
}

/// Whether `path` is a mounted network namespace (its own device, not the
/// directory's), not a leftover empty file whose mount went with another mount
/// namespace.
pub fn is_netns_mount(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(file), Some(Ok(dir))) = (
        std::fs::metadata(path),
        path.parent().map(std::fs::metadata),
    ) else {
        return false;
    };
    file.dev() != dir.dev()
}

fn ip_batch(host: &Host, cmds: &[String], report: &mut ApplyReport) -> Result<()> {
    if cmds.is_empty() {
        return Ok(());
    }
    run(
        &host.ip_argv(&["-batch", "-"]),
        Some(&(cmds.join("\n") + "\n")),
    )?;
    report
        .changes
        .extend(cmds.iter().map(|c| format!("ip {c}")));
    Ok(())
}

fn enable_forwarding(host: &Host, report: &mut ApplyReport) -> Result<()> {
    let cur = run(
        &host.exec_argv("sysctl", &["-n", "net.ipv4.ip_forward"]),
        None,
    )?;
    if cur.trim() != "1" {
        run(
            &host.exec_argv("sysctl", &["-qw", "net.ipv4.ip_forward=1"]),
            None,
        )?;
        report.changes.push(format!(
            "sysctl net.ipv4.ip_forward=1 in {}",
            host.netns.as_deref().unwrap_or("the node")
        ));
    }
    Ok(())
}

/// Reads the gateway namespace (links, addresses, routes, gateway neighbours).
fn observe_ns(ns: &Host) -> Result<ObservedNs> {
    let links: BTreeMap<String, LinkState> = observe::links(ns)?
        .into_iter()
        .map(|l| (l.name.clone(), l))
        .collect();
    let neigh = if links.contains_key(names::NS_GATEWAY_IF) {
        observe::neighbours(ns, names::NS_GATEWAY_IF)?
    } else {
        BTreeSet::new()
    };
    Ok(ObservedNs {
        addrs: observe::all_addresses(ns)?,
        routes: observe::routes(ns)?,
        neigh,
        links,
    })
}

/// `ip -batch` lines creating/fixing the bridge, the VXLAN device, the ports and
/// the node sides of the gateway and transit veths (their inner ends are created
/// in the network's namespace with them).
pub fn link_commands(
    plan: &NetworkPlan,
    links: &BTreeMap<String, LinkState>,
) -> (Vec<String>, Vec<String>) {
    let mut c = Vec::new();
    let mtu = plan.mtu.link_mtu;
    let (br, vx) = (&plan.bridge, &plan.vxlan);
    let gw = plan.bridge_mac.to_string();

    match links.get(br) {
        Some(l) if l.kind.as_deref() == Some("bridge") => {
            if l.mtu != mtu {
                c.push(format!("link set dev {br} mtu {mtu}"));
            }
            if l.mac.as_deref() != Some(gw.as_str()) {
                c.push(format!("link set dev {br} address {gw}"));
            }
        }
        other => {
            if other.is_some() {
                c.push(format!("link del dev {br}"));
            }
            // Multicast snooping off: multicast floods like broadcast (head-end
            // replicated), since guests' IGMP reports never reach other nodes'
            // bridges. No IPv6 link-local: nothing of the node belongs on the
            // network.
            c.push(format!(
                "link add name {br} address {gw} mtu {mtu} type bridge mcast_snooping 0 stp_state 0"
            ));
            c.push(format!("link set dev {br} addrgenmode none"));
        }
    }

    let want_vx = |l: &LinkState| {
        l.vxlan.as_ref().is_some_and(|v| {
            v.id == plan.vni
                && v.local == Some(plan.local_vtep)
                && v.port == VXLAN_PORT
                && !v.learning
        })
    };
    match links.get(vx) {
        Some(l) if want_vx(l) => {
            if l.mtu != mtu {
                c.push(format!("link set dev {vx} mtu {mtu}"));
            }
            if l.master.as_deref() != Some(br.as_str()) {
                c.push(format!("link set dev {vx} master {br}"));
            }
            if !l.up {
                c.push(format!("link set dev {vx} up"));
            }
        }
        other => {
            if other.is_some() {
                c.push(format!("link del dev {vx}"));
            }
            c.push(format!(
                "link add name {vx} mtu {mtu} type vxlan id {} local {} dstport {VXLAN_PORT} nolearning",
                plan.vni, plan.local_vtep
            ));
            c.push(format!("link set dev {vx} addrgenmode none"));
            c.push(format!("link set dev {vx} master {br}"));
            c.push(format!("link set dev {vx} up"));
        }
    }

    let gv = &plan.gateway_veth;
    match links.get(gv) {
        Some(l) => {
            if l.mtu != mtu {
                c.push(format!("link set dev {gv} mtu {mtu}"));
            }
            if l.master.as_deref() != Some(br.as_str()) {
                c.push(format!("link set dev {gv} master {br}"));
            }
            if !l.up {
                c.push(format!("link set dev {gv} up"));
            }
        }
        None => {
            c.push(format!(
                "link add name {gv} mtu {mtu} type veth peer name {} mtu {mtu} netns {}",
                names::NS_GATEWAY_IF,
                plan.netns
            ));
            c.push(format!("link set dev {gv} addrgenmode none"));
            c.push(format!("link set dev {gv} master {br}"));
            c.push(format!("link set dev {gv} up"));
        }
    }
    let tv = &plan.transit_veth;
    match (links.get(tv), plan.transit) {
        (Some(l), Some(_)) => {
            if !l.up {
                c.push(format!("link set dev {tv} up"));
            }
        }
        (None, Some(_)) => {
            c.push(format!(
                "link add name {tv} type veth peer name {} netns {}",
                names::NS_UPLINK_IF,
                plan.netns
            ));
            c.push(format!("link set dev {tv} addrgenmode none"));
            c.push(format!("link set dev {tv} up"));
        }
        (Some(_), None) => c.push(format!("link del dev {tv}")),
        (None, None) => {}
    }

    let external_port = plan.external.as_ref().map(|(_, p)| p.as_str());
    // A VLAN sub-interface or external VXLAN device of an earlier plan goes away.
    let stale_external: Vec<String> = [
        names::vlan_uplink(plan.vni),
        names::external_vxlan(plan.vni),
    ]
    .into_iter()
    .filter(|n| links.contains_key(n) && external_port != Some(n.as_str()))
    .collect();
    for stale in &stale_external {
        c.push(format!("link del dev {stale}"));
    }
    if let Some((ext, port)) = &plan.external {
        external_link_commands(&mut c, plan, ext, port, links.get(port));
    }

    let mut missing = Vec::new();
    for p in &plan.ports {
        match links.get(p) {
            None => missing.push(p.clone()),
            Some(l) => {
                if l.mtu != mtu {
                    c.push(format!("link set dev {p} mtu {mtu}"));
                }
                if l.master.as_deref() != Some(br.as_str()) {
                    c.push(format!("link set dev {p} master {br}"));
                }
                if !l.up {
                    c.push(format!("link set dev {p} up"));
                }
            }
        }
    }
    // Detach: ports no longer on this network are released, never deleted.
    for l in links.values() {
        if l.master.as_deref() == Some(br.as_str())
            && l.name != *vx
            && l.name != *gv
            && Some(l.name.as_str()) != external_port
            && !stale_external.contains(&l.name)
            && !plan.ports.contains(&l.name)
        {
            c.push(format!("link set dev {} nomaster", l.name));
        }
    }
    if !links
        .get(br)
        .is_some_and(|l| l.up && l.kind.as_deref() == Some("bridge"))
    {
        c.push(format!("link set dev {br} up"));
    }
    (c, missing)
}

/// Lines creating or fixing the bridge port towards the outside segment. The
/// uplink interface itself belongs to the node: it is enslaved and brought up,
/// never created, deleted or resized; the VLAN sub-interface and the external VXLAN
/// device are the switch's own.
fn external_link_commands(
    c: &mut Vec<String>,
    plan: &NetworkPlan,
    ext: &ExternalL2,
    port: &str,
    have: Option<&LinkState>,
) {
    let (br, mtu) = (&plan.bridge, plan.mtu.link_mtu);
    let create = match ext {
        ExternalL2::Uplink { vlan: None, .. } => None,
        ExternalL2::Uplink {
            interface,
            vlan: Some(v),
        } => {
            let ok = have.is_some_and(|l| {
                l.kind.as_deref() == Some("vlan")
                    && l.vlan_id == Some(u32::from(*v))
                    && l.parent.as_deref() == Some(interface.as_str())
            });
            (!ok).then(|| {
                format!("link add link {interface} name {port} mtu {mtu} type vlan id {v}")
            })
        }
        ExternalL2::Vtep {
            address,
            port: udp,
            vni,
        } => {
            let ok = have.and_then(|l| l.vxlan.as_ref()).is_some_and(|x| {
                x.id == *vni
                    && x.local == Some(plan.local_vtep)
                    && x.port == *udp
                    && x.remote == Some(*address)
                    && !x.learning
            });
            // `remote` is the device's default destination: everything without a
            // more specific FDB entry (all of it, with learning off) goes there.
            (!ok).then(|| {
                format!(
                    "link add name {port} mtu {mtu} type vxlan id {vni} local {} remote {address} dstport {udp} nolearning",
                    plan.local_vtep
                )
            })
        }
    };
    match (create, have) {
        (Some(add), old) => {
            if old.is_some() {
                c.push(format!("link del dev {port}"));
            }
            c.push(add);
            c.push(format!("link set dev {port} addrgenmode none"));
            c.push(format!("link set dev {port} master {br}"));
            c.push(format!("link set dev {port} up"));
        }
        (None, Some(l)) => {
            if l.mtu != mtu && !matches!(ext, ExternalL2::Uplink { vlan: None, .. }) {
                c.push(format!("link set dev {port} mtu {mtu}"));
            }
            if l.master.as_deref() != Some(br.as_str()) {
                c.push(format!("link set dev {port} master {br}"));
            }
            if !l.up {
                c.push(format!("link set dev {port} up"));
            }
        }
        // A missing uplink is refused before any command runs ([`check_external`]).
        (None, None) => {}
    }
}

/// Refuses an outside segment this node cannot carry, with the reason: the uplink
/// (or a VLAN's parent) does not exist, holds node addresses (enslaving it would cut
/// the node off), or belongs to another bridge; another device already uses the
/// external VNI and port.
pub fn check_external(
    plan: &NetworkPlan,
    links: &BTreeMap<String, LinkState>,
    addrs: &BTreeMap<String, BTreeSet<crate::addr::Ipv4Net>>,
) -> Result<()> {
    let Some((ext, port)) = &plan.external else {
        return Ok(());
    };
    let refuse = |reason: String| {
        Err(OverlayError::External {
            network: plan.name.clone(),
            reason,
        })
    };
    match ext {
        ExternalL2::Uplink { interface, vlan } => {
            let Some(l) = links.get(interface) else {
                return refuse(format!(
                    "uplink interface {interface:?} does not exist on this node"
                ));
            };
            if addrs.get(interface).is_some_and(|a| !a.is_empty()) {
                return refuse(format!(
                    "uplink interface {interface:?} has IPv4 addresses of the node; give the network a dedicated interface or VLAN"
                ));
            }
            if vlan.is_none()
                && let Some(m) = &l.master
                && *m != plan.bridge
            {
                return refuse(format!(
                    "uplink interface {interface:?} already belongs to {m}"
                ));
            }
            if let Some(l) = links.get(port)
                && vlan.is_some()
                && l.master.as_deref().is_some_and(|m| m != plan.bridge)
            {
                return refuse(format!("{port} already belongs to another bridge"));
            }
            Ok(())
        }
        ExternalL2::Vtep { port: udp, vni, .. } => {
            let clash = links.values().find(|l| {
                l.name != *port
                    && l.vxlan
                        .as_ref()
                        .is_some_and(|x| x.id == *vni && x.port == *udp)
            });
            match clash {
                Some(l) => refuse(format!(
                    "VNI {vni} on UDP port {udp} is already used by {} here",
                    l.name
                )),
                None => Ok(()),
            }
        }
    }
}

/// `bridge -batch` lines turning the observed FDB into the planned one.
pub fn fdb_commands(
    plan: &NetworkPlan,
    have: &observe::FdbState,
    present_ports: &BTreeSet<&str>,
) -> Vec<String> {
    let vx = &plan.vxlan;
    let mut c = Vec::new();
    let wanted_unicast: BTreeSet<Mac> = plan
        .vxlan_fdb
        .iter()
        .map(|e| e.mac)
        .filter(|m| *m != Mac::ZERO)
        .collect();
    // Replace/add first so a moving MAC never lacks an entry.
    for e in plan.vxlan_fdb.difference(&have.vxlan) {
        if e.mac == Mac::ZERO {
            c.push(format!(
                "fdb append {} dev {vx} dst {} self permanent",
                e.mac, e.dst
            ));
        } else {
            c.push(format!(
                "fdb replace {} dev {vx} dst {} self permanent",
                e.mac, e.dst
            ));
        }
    }
    for e in have.vxlan.difference(&plan.vxlan_fdb) {
        if e.mac == Mac::ZERO {
            c.push(format!("fdb del {} dev {vx} dst {} self", e.mac, e.dst));
        } else if !wanted_unicast.contains(&e.mac) {
            c.push(format!("fdb del {} dev {vx} self", e.mac));
        }
    }
    let gv = plan.gateway_veth.as_str();
    let usable = |p: &str| p == vx.as_str() || p == gv || present_ports.contains(p);
    let wanted_static: BTreeSet<Mac> = plan
        .bridge_fdb
        .iter()
        .filter(|e| usable(&e.port))
        .map(|e| e.mac)
        .collect();
    for e in plan.bridge_fdb.difference(&have.bridge_static) {
        if usable(&e.port) {
            let sticky = if e.port == gv { " sticky" } else { "" };
            c.push(format!(
                "fdb replace {} dev {} master static{sticky}",
                e.mac, e.port
            ));
        }
    }
    for e in have.bridge_static.difference(&plan.bridge_fdb) {
        // Entries on ports leaving the bridge go away with the release itself.
        let port_stays = e.port == *vx || e.port == gv || plan.ports.contains(&e.port);
        if port_stays && !wanted_static.contains(&e.mac) {
            c.push(format!("fdb del {} dev {} master", e.mac, e.port));
        }
    }
    c
}

/// `ip -batch` lines for the node namespace's addresses: the transit end on
/// `hvu<vni>`, and none on the bridge (an agent of the old layout put the gateway
/// there; in the node namespace it would clash with other networks' subnets).
pub fn node_l3_commands(
    plan: &NetworkPlan,
    addrs: &BTreeMap<String, BTreeSet<crate::addr::Ipv4Net>>,
) -> Vec<String> {
    let mut c = Vec::new();
    let none = BTreeSet::new();
    for a in addrs.get(&plan.bridge).unwrap_or(&none) {
        c.push(format!("addr del {a} dev {}", plan.bridge));
    }
    if let Some(t) = plan.transit {
        let want: BTreeSet<_> = [t.node_net()].into();
        let have = addrs.get(&plan.transit_veth).unwrap_or(&none);
        for a in want.difference(have) {
            c.push(format!("addr add {a} dev {}", plan.transit_veth));
        }
        for a in have.difference(&want) {
            c.push(format!("addr del {a} dev {}", plan.transit_veth));
        }
    }
    c
}

/// `ip -batch` lines (run in the gateway namespace) for the static neighbour
/// entries of the gateway interface.
pub fn neigh_commands(
    plan: &NetworkPlan,
    neigh: &BTreeSet<(std::net::Ipv4Addr, Mac)>,
) -> Vec<String> {
    let gw = names::NS_GATEWAY_IF;
    let mut c = Vec::new();
    let wanted_ips: BTreeSet<_> = plan.neighbours.iter().map(|(ip, _)| *ip).collect();
    for (ip, mac) in plan.neighbours.difference(neigh) {
        c.push(format!(
            "neigh replace {ip} lladdr {mac} dev {gw} nud permanent"
        ));
    }
    for (ip, _) in neigh.difference(&plan.neighbours) {
        if !wanted_ips.contains(ip) {
            c.push(format!("neigh del {ip} dev {gw}"));
        }
    }
    c
}

/// `ip -batch` lines (run in the gateway namespace) for its links, addresses,
/// routes and neighbours. The veths themselves come from [`link_commands`].
pub fn ns_commands(plan: &NetworkPlan, seen: &ObservedNs) -> Vec<String> {
    let mut c = Vec::new();
    let up = |name: &str| seen.links.get(name).is_some_and(|l| l.up);
    if !up("lo") {
        c.push("link set dev lo up".to_string());
    }
    let gw = names::NS_GATEWAY_IF;
    let none = BTreeSet::new();
    if let Some(l) = seen.links.get(gw) {
        let mac = plan.gateway_mac.to_string();
        if l.mac.as_deref() != Some(mac.as_str()) {
            c.push(format!("link set dev {gw} address {mac}"));
        }
        if l.mtu != plan.mtu.link_mtu {
            c.push(format!("link set dev {gw} mtu {}", plan.mtu.link_mtu));
        }
        if !l.addrgen_none {
            // No IPv6 link-local: the anycast gateway MAC would make every node's
            // address collide in DAD.
            c.push(format!("link set dev {gw} addrgenmode none"));
        }
        let have = seen.addrs.get(gw).unwrap_or(&none);
        for a in plan.addresses.difference(have) {
            c.push(format!("addr add {a} dev {gw}"));
        }
        for a in have.difference(&plan.addresses) {
            c.push(format!("addr del {a} dev {gw}"));
        }
        if !l.up {
            c.push(format!("link set dev {gw} up"));
        }
        c.extend(neigh_commands(plan, &seen.neigh));
    }
    let upl = names::NS_UPLINK_IF;
    if let (Some(t), Some(l)) = (plan.transit, seen.links.get(upl)) {
        let want: BTreeSet<_> = [t.gateway_net()].into();
        let have = seen.addrs.get(upl).unwrap_or(&none);
        for a in want.difference(have) {
            c.push(format!("addr add {a} dev {upl}"));
        }
        for a in have.difference(&want) {
            c.push(format!("addr del {a} dev {upl}"));
        }
        if !l.up {
            c.push(format!("link set dev {upl} up"));
        }
        let via = t.node.to_string();
        let has_default = seen.routes.iter().any(|r| {
            r.dst == "default"
                && r.gateway.as_deref() == Some(via.as_str())
                && r.dev.as_deref() == Some(upl)
        });
        if !has_default {
            c.push(format!("route replace default via {via} dev {upl}"));
        }
    }
    for (peer, subnets) in &plan.peer_routes {
        let link = names::peer_link(*peer);
        let Some(l) = seen.links.get(&link) else {
            continue;
        };
        if !l.up {
            c.push(format!("link set dev {link} up"));
        }
        for net in subnets {
            let dst = net.network().to_string();
            if !seen
                .routes
                .iter()
                .any(|r| r.dst == dst && r.dev.as_deref() == Some(link.as_str()))
            {
                c.push(format!("route replace {dst} dev {link}"));
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{FdbState, VxlanParams};
    use crate::plan::tests::sample;
    use crate::plan::{BridgeFdb, VxlanFdb};
    use crate::spec::Location;
    use crate::transit::TransitPair;

    fn plan() -> NetworkPlan {
        build_plan(&sample(), &Host::new("/x"), None).unwrap()
    }

    fn converged_links(p: &NetworkPlan) -> BTreeMap<String, LinkState> {
        let mk =
            |name: &str, kind: Option<&str>, master: Option<&str>, mac: Option<String>| LinkState {
                name: name.into(),
                kind: kind.map(String::from),
                mtu: 1500,
                mac,
                master: master.map(String::from),
                up: true,
                addrgen_none: true,
                vxlan: (kind == Some("vxlan")).then_some(VxlanParams {
                    id: p.vni,
                    local: Some(p.local_vtep),
                    port: VXLAN_PORT,
                    learning: false,
                    remote: None,
                }),
                vlan_id: None,
                parent: None,
            };
        [
            mk(
                &p.bridge,
                Some("bridge"),
                None,
                Some(p.bridge_mac.to_string()),
            ),
            mk(&p.vxlan, Some("vxlan"), Some(&p.bridge), None),
            mk(&p.gateway_veth, Some("veth"), Some(&p.bridge), None),
            mk("hvp1", Some("veth"), Some(&p.bridge), None),
        ]
        .into_iter()
        .map(|l| (l.name.clone(), l))
        .collect()
    }

    #[test]
    fn the_external_port_is_created_enslaved_and_removed_with_its_mode() {
        use crate::spec::ExternalL2;
        let mut spec = sample();
        spec.external = Some(ExternalL2::Vtep {
            address: "192.0.2.9".parse().unwrap(),
            port: 4790,
            vni: 5000,
        });
        let p = build_plan(&spec, &Host::new("/x"), None).unwrap();
        let mut links = converged_links(&p);
        let (c, _) = link_commands(&p, &links);
        assert!(
            c.contains(&"link add name hve4242 mtu 1500 type vxlan id 5000 local 192.168.77.1 remote 192.0.2.9 dstport 4790 nolearning".to_string())
                && c.contains(&"link set dev hve4242 master hvb4242".to_string()),
            "{c:?}"
        );
        let mut hve = links["hvp1"].clone();
        hve.name = "hve4242".into();
        hve.kind = Some("vxlan".into());
        hve.vxlan = Some(VxlanParams {
            id: 5000,
            local: Some(p.local_vtep),
            port: 4790,
            learning: false,
            remote: Some("192.0.2.9".parse().unwrap()),
        });
        links.insert(hve.name.clone(), hve);
        assert_eq!(link_commands(&p, &links).0, Vec::<String>::new());

        // Back to a plain overlay: the device goes, and is not also released.
        let plain = plan();
        let (c, _) = link_commands(&plain, &links);
        assert_eq!(c, vec!["link del dev hve4242".to_string()]);

        // An uplink VLAN is a sub-interface of the node's interface.
        spec.external = Some(ExternalL2::Uplink {
            interface: "eth1".into(),
            vlan: Some(30),
        });
        let p = build_plan(&spec, &Host::new("/x"), None).unwrap();
        let (c, _) = link_commands(&p, &converged_links(&p));
        assert!(
            c.contains(&"link add link eth1 name hvl4242 mtu 1500 type vlan id 30".to_string()),
            "{c:?}"
        );
        // A plain uplink is enslaved as it is (its MTU is the node's business).
        spec.external = Some(ExternalL2::Uplink {
            interface: "eth1".into(),
            vlan: None,
        });
        let p = build_plan(&spec, &Host::new("/x"), None).unwrap();
        let mut links = converged_links(&p);
        let mut eth1 = links["hvp1"].clone();
        eth1.name = "eth1".into();
        eth1.master = None;
        eth1.mtu = 9000;
        links.insert("eth1".into(), eth1);
        let (c, _) = link_commands(&p, &links);
        assert_eq!(c, vec!["link set dev eth1 master hvb4242".to_string()]);
    }

    #[test]
    fn an_uplink_the_node_cannot_give_is_refused_with_the_reason() {
        use crate::spec::ExternalL2;
        let mut spec = sample();
        spec.external = Some(ExternalL2::Uplink {
            interface: "eth1".into(),
            vlan: None,
        });
        let p = build_plan(&spec, &Host::new("/x"), None).unwrap();
        let mut links = converged_links(&p);
        let mut addrs = BTreeMap::new();
        let err = check_external(&p, &links, &addrs).unwrap_err().to_string();
        assert!(
            err.contains("\"eth1\" does not exist on this node"),
            "{err}"
        );
        let mut eth1 = links["hvp1"].clone();
        eth1.name = "eth1".into();
        eth1.master = Some("hvb7".into());
        links.insert("eth1".into(), eth1.clone());
        let err = check_external(&p, &links, &addrs).unwrap_err().to_string();
        assert!(err.contains("already belongs to hvb7"), "{err}");
        eth1.master = None;
        links.insert("eth1".into(), eth1);
        addrs.insert(
            "eth1".to_string(),
            BTreeSet::from(["10.0.0.5/24".parse::<crate::addr::Ipv4Net>().unwrap()]),
        );
        let err = check_external(&p, &links, &addrs).unwrap_err().to_string();
        assert!(err.contains("has IPv4 addresses of the node"), "{err}");
        addrs.clear();
        check_external(&p, &links, &addrs).unwrap();
    }

    #[test]
    fn fresh_node_creates_everything_and_reports_missing_ports() {
        let (cmds, missing) = link_commands(&plan(), &BTreeMap::new());
        assert!(
            cmds[0].starts_with(
                "link add name hvb4242 address 02:68:62:00:10:92 mtu 1500 type bridge"
            ),
            "the bridge never holds the gateway MAC: {cmds:?}"
        );
        assert!(
            cmds.contains(
                &"link add name hvg4242 mtu 1500 type veth peer name gw0 mtu 1500 netns hvx-n-4242"
                    .to_string()
            )
        );
        assert!(cmds.contains(&"link set dev hvg4242 master hvb4242".to_string()));
        assert!(
            !cmds.iter().any(|c| c.contains("hvu4242")),
            "no transit without egress: {cmds:?}"
        );
        assert!(
            cmds.iter().any(
                |c| c.contains("type vxlan id 4242 local 192.168.77.1 dstport 4789 nolearning")
            )
        );
        assert_eq!(missing, ["hvp1"]);
        assert_eq!(cmds.last().unwrap(), "link set dev hvb4242 up");
    }

    #[test]
    fn converged_links_need_nothing_and_stray_ports_are_released() {
        let p = plan();
        let mut links = converged_links(&p);
        assert_eq!(link_commands(&p, &links), (vec![], vec![]));
        let mut stray = links["hvp1"].clone();
        stray.name = "old-vm".into();
        links.insert("old-vm".into(), stray);
        assert_eq!(
            link_commands(&p, &links).0,
            ["link set dev old-vm nomaster"]
        );
    }

    #[test]
    fn changed_vxlan_parameters_recreate_the_device() {
        let p = plan();
        let mut links = converged_links(&p);
        if let Some(v) = links.get_mut("hvv4242").and_then(|l| l.vxlan.as_mut()) {
            v.local = Some("192.168.77.9".parse().unwrap());
        }
        let cmds = link_commands(&p, &links).0;
        assert_eq!(cmds[0], "link del dev hvv4242");
        assert!(cmds[1].starts_with("link add name hvv4242"));
    }

    #[test]
    fn fdb_diff_is_minimal_and_moves_replace() {
        let p = plan();
        let ports: BTreeSet<&str> = ["hvp1"].into();
        let fresh = fdb_commands(&p, &FdbState::default(), &ports);
        assert_eq!(
            fresh
                .iter()
                .filter(|c| c.starts_with("fdb append 00:00:00:00:00:00"))
                .count(),
            2
        );
        assert!(fresh.contains(
            &"fdb replace 02:68:76:00:10:92 dev hvg4242 master static sticky".to_string()
        ));
        assert_eq!(fresh.len(), 6);
        let have = FdbState {
            vxlan: p.vxlan_fdb.clone(),
            bridge_static: p.bridge_fdb.clone(),
        };
        assert!(fdb_commands(&p, &have, &ports).is_empty());

        // The DB VM moved from .2 to .3 and a stale entry lingers.
        let mut moved = have.clone();
        let db: Mac = "00:50:56:00:00:02".parse().unwrap();
        moved.vxlan.retain(|e| e.mac != db);
        moved.vxlan.insert(VxlanFdb {
            mac: db,
            dst: "192.168.77.3".parse().unwrap(),
        });
        moved.bridge_static.insert(BridgeFdb {
            mac: "00:50:56:00:00:99".parse().unwrap(),
            port: "hvp1".into(),
        });
        let cmds = fdb_commands(&p, &moved, &ports);
        assert_eq!(
            cmds,
            [
                "fdb replace 00:50:56:00:00:02 dev hvv4242 dst 192.168.77.2 self permanent",
                "fdb del 00:50:56:00:00:99 dev hvp1 master",
            ]
        );
    }

    #[test]
    fn entries_for_missing_ports_are_deferred() {
        let p = plan();
        let cmds = fdb_commands(&p, &FdbState::default(), &BTreeSet::new());
        assert!(!cmds.iter().any(|c| c.contains("hvp1")));
    }

    #[test]
    fn only_pure_membership_changes_take_the_fast_path() {
        let old = plan();
        let mut spec = sample();
        spec.members[1].location = Location::Remote {
            vtep: "192.168.77.3".parse().unwrap(),
        };
        assert!(membership_only_change(
            &old,
            &build_plan(&spec, &Host::new("/x"), None).unwrap()
        ));
        // A VM arriving on this node adds a port: full path.
        spec.members[1].location = Location::Local {
            port: "hvp2".into(),
        };
        assert!(!membership_only_change(
            &old,
            &build_plan(&spec, &Host::new("/x"), None).unwrap()
        ));
        let mut spec = sample();
        spec.egress_nat = true;
        assert!(!membership_only_change(
            &old,
            &build_plan(&spec, &Host::new("/x"), None).unwrap()
        ));
    }

    fn converged_ns(p: &NetworkPlan) -> ObservedNs {
        let mk = |name: &str, mac: Option<String>, mtu: u32| LinkState {
            name: name.into(),
            kind: Some("veth".into()),
            mtu,
            mac,
            master: None,
            up: true,
            addrgen_none: true,
            vxlan: None,
            vlan_id: None,
            parent: None,
        };
        let t = TransitPair::of_slot(3);
        ObservedNs {
            links: [
                mk("lo", None, 65536),
                mk("gw0", Some(p.gateway_mac.to_string()), 1500),
                mk("up0", None, 1500),
            ]
            .into_iter()
            .map(|l| (l.name.clone(), l))
            .collect(),
            addrs: [
                ("gw0".to_string(), p.addresses.clone()),
                ("up0".to_string(), [t.gateway_net()].into()),
            ]
            .into(),
            routes: vec![observe::Route {
                dst: "default".into(),
                gateway: Some(t.node.to_string()),
                dev: Some("up0".into()),
            }],
            neigh: p.neighbours.clone(),
        }
    }

    #[test]
    fn the_gateway_namespace_gets_address_mac_transit_and_neighbours() {
        let mut spec = sample();
        spec.egress_nat = true;
        let p = build_plan(&spec, &Host::new("/x"), Some(3)).unwrap();
        let seen = converged_ns(&p);
        assert_eq!(ns_commands(&p, &seen), Vec::<String>::new());
        // A fresh namespace: the veth ends exist (made with the node sides) bare.
        let mut fresh = seen;
        for l in fresh.links.values_mut() {
            l.up = false;
            l.mac = None;
            l.addrgen_none = false;
        }
        fresh.addrs.clear();
        fresh.routes.clear();
        fresh.neigh.clear();
        let cmds = ns_commands(&p, &fresh);
        for want in [
            "link set dev lo up",
            "link set dev gw0 address 02:68:76:00:10:92",
            "link set dev gw0 addrgenmode none",
            "addr add 10.50.0.1/24 dev gw0",
            "link set dev gw0 up",
            "neigh replace 10.50.0.11 lladdr 00:50:56:00:00:01 dev gw0 nud permanent",
            "addr add 169.254.64.7/31 dev up0",
            "route replace default via 169.254.64.6 dev up0",
        ] {
            assert!(cmds.contains(&want.to_string()), "{want} in {cmds:?}");
        }
        // The node side: the transit end on hvu, nothing on the bridge.
        let stale: BTreeMap<String, BTreeSet<crate::addr::Ipv4Net>> =
            [("hvb4242".to_string(), p.addresses.clone())].into();
        assert_eq!(
            node_l3_commands(&p, &stale),
            [
                "addr del 10.50.0.1/24 dev hvb4242",
                "addr add 169.254.64.6/31 dev hvu4242"
            ]
        );
        let stale: BTreeSet<_> = [("10.50.0.99".parse().unwrap(), Mac([2, 0, 0, 0, 0, 1]))].into();
        assert!(neigh_commands(&p, &stale).contains(&"neigh del 10.50.0.99 dev gw0".to_string()));
    }

    #[test]
    fn peer_links_get_routes_to_the_peer_subnets_once_they_exist() {
        let mut spec = sample();
        spec.routed_peers = vec![crate::spec::RoutedPeer {
            vni: 7,
            subnets: vec!["10.9.0.0/16".parse().unwrap()],
        }];
        let p = build_plan(&spec, &Host::new("/x"), None).unwrap();
        let mut seen = converged_ns(&p);
        seen.links.remove("up0");
        // The peer's namespace is not there yet: no link, no route.
        assert!(ns_commands(&p, &seen).is_empty());
        let mut rp = seen.links["gw0"].clone();
        rp.name = "rp7".into();
        rp.up = false;
        seen.links.insert("rp7".into(), rp);
        assert_eq!(
            ns_commands(&p, &seen),
            ["link set dev rp7 up", "route replace 10.9.0.0/16 dev rp7"]
        );
        seen.links.get_mut("rp7").unwrap().up = true;
        seen.routes.push(observe::Route {
            dst: "10.9.0.0/16".into(),
            gateway: None,
            dev: Some("rp7".into()),
        });
        assert!(ns_commands(&p, &seen).is_empty());
    }

    #[test]
    fn a_bridge_of_the_old_layout_gives_up_the_gateway_mac_and_address() {
        let p = plan();
        let mut links = converged_links(&p);
        links.get_mut("hvb4242").unwrap().mac = Some(p.gateway_mac.to_string());
        assert_eq!(
            link_commands(&p, &links).0,
            ["link set dev hvb4242 address 02:68:62:00:10:92"]
        );
        let addrs: BTreeMap<String, BTreeSet<crate::addr::Ipv4Net>> =
            [("hvb4242".to_string(), p.addresses.clone())].into();
        assert_eq!(
            node_l3_commands(&p, &addrs),
            ["addr del 10.50.0.1/24 dev hvb4242"]
        );
    }

    #[test]
    fn an_empty_file_is_no_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("hvx-n-7");
        std::fs::write(&stale, "").unwrap();
        assert!(!is_netns_mount(&stale));
        assert!(!is_netns_mount(&dir.path().join("absent")));
    }

    #[test]
    fn the_transit_veth_follows_the_need_for_it() {
        let mut spec = sample();
        spec.egress_nat = true;
        let p = build_plan(&spec, &Host::new("/x"), Some(3)).unwrap();
        let links = converged_links(&p);
        let cmds = link_commands(&p, &links).0;
        assert_eq!(
            cmds[0],
            "link add name hvu4242 type veth peer name up0 netns hvx-n-4242"
        );
        let mut with = links.clone();
        let mut hvu = links["hvg4242"].clone();
        hvu.name = "hvu4242".into();
        hvu.master = None;
        with.insert(hvu.name.clone(), hvu);
        assert!(link_commands(&p, &with).0.is_empty());
        // Egress switched off: the pair goes.
        let without = plan();
        assert_eq!(link_commands(&without, &with).0, ["link del dev hvu4242"]);
    }
}
