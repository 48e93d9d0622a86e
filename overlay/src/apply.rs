//! The applier: diffs a [`NetworkPlan`] against the kernel and changes only the
//! difference. Running it twice changes nothing; after an agent restart it finds
//! everything by name and leaves working links alone (no flap, no traffic cut).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::addr::Mac;
use crate::daemon::{self, DaemonAction};
use crate::dnsmasq::DnsmasqPaths;
use crate::error::{OverlayError, Result};
use crate::host::{Host, run};
use crate::names::{self, OwnedLink, VXLAN_PORT};
use crate::nft::marker_chain;
use crate::observe::{self, LinkState};
use crate::plan::{NetworkPlan, build_plan};
use crate::spec::NetworkSpec;

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
    neigh: BTreeSet<(std::net::Ipv4Addr, Mac)>,
    addrs: BTreeSet<crate::addr::Ipv4Net>,
}

/// The overlay switch of one node.
#[derive(Debug, Clone)]
pub struct Switch {
    pub host: Host,
    /// Plans this process applied successfully. Only a cache: a restarted agent
    /// starts empty and does a full diff; it enables the membership fast path.
    applied: Arc<Mutex<BTreeMap<u32, NetworkPlan>>>,
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
        build_plan(spec, &self.host.state_root)
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
        let neigh = observe::neighbours(&self.host, &plan.bridge)?;
        let cmds = l3_commands(plan, &neigh, &plan.addresses);
        self.ip_batch(&cmds, &mut report)?;
        if let Some(cfg) = &plan.dnsmasq
            && daemon::ensure(&self.host, &plan.name, cfg)? != DaemonAction::Unchanged
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
        // Every read runs at once (each is a process start); a MAC move waits on them.
        let mut seen = self.observe_all(plan, previous.is_none())?;
        // Rules first: they match ports by name, so a port never forwards a frame
        // before its firewall and gateway isolation are in place.
        match (&seen.chains, previous) {
            (Some(chains), _) => self.apply_nft(plan, chains, &mut report)?,
            (None, Some(prev)) if prev.nft_hash == plan.nft_hash => {}
            (None, _) => self.apply_nft(plan, &[], &mut report)?,
        }
        let (link_cmds, missing) = link_commands(plan, &seen.links);
        report.missing_ports = missing;
        self.ip_batch(&link_cmds, &mut report)?;
        if link_cmds.iter().any(|c| c.starts_with("link add")) {
            // A (re)created device starts empty: what was read before is stale.
            seen.fdb = observe::fdb(&self.host, &plan.bridge, &plan.vxlan)?;
            seen.neigh = observe::neighbours(&self.host, &plan.bridge)?;
            seen.addrs = observe::addresses(&self.host, &plan.bridge)?;
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

        let l3_cmds = l3_commands(plan, &seen.neigh, &seen.addrs);
        self.ip_batch(&l3_cmds, &mut report)?;

        if plan.needs_forwarding && !previous.is_some_and(|p| p.needs_forwarding) {
            self.enable_forwarding(&mut report)?;
        }

        if let Some(cfg) = &plan.dnsmasq {
            match daemon::ensure(&self.host, &plan.name, cfg)? {
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

    fn ip_batch(&self, cmds: &[String], report: &mut ApplyReport) -> Result<()> {
        if cmds.is_empty() {
            return Ok(());
        }
        run(
            &self.host.ip_argv(&["-batch", "-"]),
            Some(&(cmds.join("\n") + "\n")),
        )?;
        report
            .changes
            .extend(cmds.iter().map(|c| format!("ip {c}")));
        Ok(())
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

    fn enable_forwarding(&self, report: &mut ApplyReport) -> Result<()> {
        let cur = run(
            &self
                .host
                .exec_argv("sysctl", &["-n", "net.ipv4.ip_forward"]),
            None,
        )?;
        if cur.trim() != "1" {
            run(
                &self
                    .host
                    .exec_argv("sysctl", &["-qw", "net.ipv4.ip_forward=1"]),
                None,
            )?;
            report.changes.push("sysctl net.ipv4.ip_forward=1".into());
        }
        Ok(())
    }

    /// Reads links, nft chains, FDB, neighbours and addresses concurrently. The
    /// per-bridge reads fail when the bridge does not exist yet; then they are empty.
    fn observe_all(&self, plan: &NetworkPlan, read_nft: bool) -> Result<Observed> {
        let (links, chains, fdb, neigh, addrs) = std::thread::scope(|s| {
            let links = s.spawn(|| observe::links(&self.host));
            let chains = s.spawn(|| {
                if read_nft {
                    observe::nft_chains(&self.host).map(Some)
                } else {
                    Ok(None)
                }
            });
            let fdb = s.spawn(|| observe::fdb(&self.host, &plan.bridge, &plan.vxlan));
            let neigh = s.spawn(|| observe::neighbours(&self.host, &plan.bridge));
            let addrs = s.spawn(|| observe::addresses(&self.host, &plan.bridge));
            (
                joined(links.join()),
                joined(chains.join()),
                joined(fdb.join()),
                joined(neigh.join()),
                joined(addrs.join()),
            )
        });
        let links: BTreeMap<String, LinkState> =
            links?.into_iter().map(|l| (l.name.clone(), l)).collect();
        let bridge_exists = links.contains_key(&plan.bridge);
        Ok(Observed {
            chains: chains?,
            fdb: or_empty(bridge_exists, fdb)?,
            neigh: or_empty(bridge_exists, neigh)?,
            addrs: or_empty(bridge_exists, addrs)?,
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

    /// Removes every trace of a network: dnsmasq, links (ports are released, not
    /// deleted: they belong to the VM pods), nft tables, state files. Absent things
    /// count as removed; every step runs even if an earlier one failed.
    pub fn teardown(&self, vni: u32) -> Result<()> {
        self.remember(None, vni);
        let mut errors: Vec<String> = Vec::new();
        let dir = self.host.state_dir(vni);
        if let Err(e) = daemon::stop(&DnsmasqPaths::new(&dir)) {
            errors.push(e.to_string());
        }
        match observe::links(&self.host) {
            Ok(links) => {
                for name in [names::vxlan(vni), names::bridge(vni)] {
                    if links.iter().any(|l| l.name == name)
                        && let Err(e) = run(&self.host.ip_argv(&["link", "del", &name]), None)
                    {
                        errors.push(e.to_string());
                    }
                }
            }
            Err(e) => errors.push(e.to_string()),
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
                Some(OwnedLink::Bridge(v) | OwnedLink::Vxlan(v)) => {
                    vnis.insert(v);
                }
                None => {}
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

/// `ip -batch` lines creating/fixing the bridge, the VXLAN device and the ports.
pub fn link_commands(
    plan: &NetworkPlan,
    links: &BTreeMap<String, LinkState>,
) -> (Vec<String>, Vec<String>) {
    let mut c = Vec::new();
    let mtu = plan.mtu.link_mtu;
    let (br, vx) = (&plan.bridge, &plan.vxlan);
    let gw = plan.gateway_mac.to_string();

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
            // bridges. No IPv6 link-local: the anycast gateway MAC would make every
            // node's address collide in DAD.
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
    let usable = |p: &str| p == vx.as_str() || present_ports.contains(p);
    let wanted_static: BTreeSet<Mac> = plan
        .bridge_fdb
        .iter()
        .filter(|e| usable(&e.port))
        .map(|e| e.mac)
        .collect();
    for e in plan.bridge_fdb.difference(&have.bridge_static) {
        if usable(&e.port) {
            c.push(format!(
                "fdb replace {} dev {} master static",
                e.mac, e.port
            ));
        }
    }
    for e in have.bridge_static.difference(&plan.bridge_fdb) {
        // Entries on ports leaving the bridge go away with the release itself.
        let port_stays = e.port == *vx || plan.ports.contains(&e.port);
        if port_stays && !wanted_static.contains(&e.mac) {
            c.push(format!("fdb del {} dev {} master", e.mac, e.port));
        }
    }
    c
}

/// `ip -batch` lines for gateway addresses and static neighbour entries.
pub fn l3_commands(
    plan: &NetworkPlan,
    neigh: &BTreeSet<(std::net::Ipv4Addr, Mac)>,
    addrs: &BTreeSet<crate::addr::Ipv4Net>,
) -> Vec<String> {
    let br = &plan.bridge;
    let mut c = Vec::new();
    for a in plan.addresses.difference(addrs) {
        c.push(format!("addr add {a} dev {br}"));
    }
    for a in addrs.difference(&plan.addresses) {
        c.push(format!("addr del {a} dev {br}"));
    }
    let wanted_ips: BTreeSet<_> = plan.neighbours.iter().map(|(ip, _)| *ip).collect();
    for (ip, mac) in plan.neighbours.difference(neigh) {
        c.push(format!(
            "neigh replace {ip} lladdr {mac} dev {br} nud permanent"
        ));
    }
    for (ip, _) in neigh.difference(&plan.neighbours) {
        if !wanted_ips.contains(ip) {
            c.push(format!("neigh del {ip} dev {br}"));
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
    use std::path::Path;

    fn plan() -> NetworkPlan {
        build_plan(&sample(), Path::new("/x")).unwrap()
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
                }),
            };
        [
            mk(
                &p.bridge,
                Some("bridge"),
                None,
                Some(p.gateway_mac.to_string()),
            ),
            mk(&p.vxlan, Some("vxlan"), Some(&p.bridge), None),
            mk("hvp1", Some("veth"), Some(&p.bridge), None),
        ]
        .into_iter()
        .map(|l| (l.name.clone(), l))
        .collect()
    }

    #[test]
    fn fresh_node_creates_everything_and_reports_missing_ports() {
        let (cmds, missing) = link_commands(&plan(), &BTreeMap::new());
        assert!(
            cmds[0].starts_with(
                "link add name hvb4242 address 02:68:76:00:10:92 mtu 1500 type bridge"
            )
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
        assert_eq!(fresh.len(), 5);
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
            &build_plan(&spec, Path::new("/x")).unwrap()
        ));
        // A VM arriving on this node adds a port: full path.
        spec.members[1].location = Location::Local {
            port: "hvp2".into(),
        };
        assert!(!membership_only_change(
            &old,
            &build_plan(&spec, Path::new("/x")).unwrap()
        ));
        let mut spec = sample();
        spec.egress_nat = true;
        assert!(!membership_only_change(
            &old,
            &build_plan(&spec, Path::new("/x")).unwrap()
        ));
    }

    #[test]
    fn l3_diff() {
        let p = plan();
        let cmds = l3_commands(&p, &BTreeSet::new(), &BTreeSet::new());
        assert_eq!(cmds[0], "addr add 10.50.0.1/24 dev hvb4242");
        assert_eq!(cmds.len(), 3);
        let stale: BTreeSet<_> = [("10.50.0.99".parse().unwrap(), Mac([2, 0, 0, 0, 0, 1]))].into();
        let cmds = l3_commands(&p, &stale, &p.addresses);
        assert!(cmds.contains(&"neigh del 10.50.0.99 dev hvb4242".to_string()));
    }
}
