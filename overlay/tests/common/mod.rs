//! Shared pieces of the privileged overlay tests: the network spec each node gets,
//! and frame capture in "VM" namespaces.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;

use hvx_overlay::lab::Lab;
use hvx_overlay::*;

pub const VNI: u32 = 100;

/// Root is the one need these tests cannot do without; say so instead of failing.
pub fn root_or_skip(test: &str) -> bool {
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    let root = String::from_utf8_lossy(&uid).trim() == "0";
    if !root {
        eprintln!("SKIP {test}: needs root (network namespaces, bridges, VXLAN)");
    }
    root
}

/// What the control plane knows about the network, independent of the node.
#[derive(Clone, Debug)]
pub struct Net {
    pub vni: u32,
    pub ips: BTreeMap<String, Ipv4Addr>,
    pub subnet: SubnetSpec,
    pub dns: DnsSpec,
    pub firewall: FirewallSpec,
    /// Lab VMs on this network; None = all of them.
    pub only: Option<Vec<String>>,
    pub egress_nat: bool,
    pub routed_peers: Vec<RoutedPeer>,
    pub exposed: Vec<ExposedPort>,
    pub egress_denied: Vec<Ipv4Net>,
    pub egress_allowed: Vec<Ipv4Net>,
    /// The outside segment and the node carrying it.
    pub external: Option<(usize, ExternalL2)>,
    pub gateway: bool,
    pub broadcast_limit_pps: u32,
}

impl Net {
    pub fn new() -> Net {
        Net {
            vni: VNI,
            ips: BTreeMap::new(),
            subnet: SubnetSpec {
                cidr: "10.77.0.0/24".parse().unwrap(),
                gateway: "10.77.0.1".parse().unwrap(),
                dhcp: None,
                reservations: vec![],
            },
            dns: DnsSpec {
                domain: Some("app.internal".into()),
                records: vec![],
                upstream: vec![],
            },
            firewall: FirewallSpec::default(),
            only: None,
            egress_nat: false,
            routed_peers: vec![],
            exposed: vec![],
            egress_denied: vec![],
            egress_allowed: vec![],
            external: None,
            gateway: true,
            broadcast_limit_pps: 0,
        }
    }

    /// The spec node `node` of the lab receives.
    pub fn spec_for(&self, lab: &Lab, node: usize) -> NetworkSpec {
        let members = lab
            .vms
            .iter()
            .filter(|vm| self.only.as_ref().is_none_or(|o| o.contains(&vm.name)))
            .map(|vm| Member {
                vm: vm.name.clone(),
                mac: vm.mac,
                ip: self.ips.get(&vm.name).copied(),
                location: if vm.node == node {
                    Location::Local {
                        port: vm.port.clone(),
                    }
                } else {
                    Location::Remote {
                        vtep: lab.nodes[vm.node].vtep,
                    }
                },
            })
            .collect();
        NetworkSpec {
            name: format!("net{}", self.vni),
            vni: self.vni,
            local_vtep: lab.nodes[node].vtep,
            underlay_mtu: lab.underlay_mtu,
            remote_vteps: lab
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != node)
                .map(|(_, n)| n.vtep)
                .collect(),
            subnets: vec![self.subnet.clone()],
            members,
            dns: self.dns.clone(),
            firewall: self.firewall.clone(),
            egress_nat: self.egress_nat,
            routed_peers: self.routed_peers.clone(),
            exposed: self.exposed.clone(),
            egress_denied: self.egress_denied.clone(),
            egress_allowed: self.egress_allowed.clone(),
            external: self
                .external
                .as_ref()
                .filter(|(carrier, _)| *carrier == node)
                .map(|(_, e)| e.clone()),
            gateway: self.gateway,
            broadcast_limit_pps: self.broadcast_limit_pps,
        }
    }

    /// Applies on every node; returns each node's report.
    pub fn apply_all(&self, lab: &Lab) -> Vec<ApplyReport> {
        (0..lab.nodes.len())
            .map(|i| {
                let spec = self.spec_for(lab, i);
                lab.nodes[i]
                    .switch
                    .apply(&spec)
                    .unwrap_or_else(|e| panic!("apply on node {i}: {e}"))
            })
            .collect()
    }
}

pub fn mac(s: &str) -> Mac {
    s.parse().unwrap()
}

/// Runs busybox udhcpc once in VM `vm` with `script` (named `name` in the lab's state
/// dir) as its event script, as a guest's DHCP client would; returns what it printed.
pub fn udhcpc(lab: &Lab, vm: &str, name: &str, script: &str) -> String {
    let path = lab.state_root.join(name);
    std::fs::create_dir_all(&lab.state_root).unwrap();
    std::fs::write(&path, script).unwrap();
    let cmd = format!(
        "chmod +x {0}; busybox udhcpc -i eth0 -n -q -f -t 10 -T 2 -s {0} 2>&1",
        path.display()
    );
    lab.exec(&lab.vm(vm).ns, &["sh", "-c", &cmd])
        .unwrap_or_else(|e| e.to_string())
}

pub fn l2frame() -> String {
    format!("{}/tests/l2frame.py", env!("CARGO_MANIFEST_DIR"))
}

/// Gives VM `name` a static address (what a guest with a fixed IP does).
pub fn set_ip(lab: &Lab, name: &str, ip: Ipv4Addr) {
    let ns = lab.vm(name).ns.clone();
    lab.exec(
        &ns,
        &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
    )
    .unwrap();
}

/// Listens on `eth0` of each VM in `listeners` for frames carrying `marker` while
/// `send` runs; returns the frames each VM saw.
pub fn capture(
    lab: &Lab,
    listeners: &[&str],
    marker: &str,
    send: impl FnOnce(),
) -> BTreeMap<String, Vec<String>> {
    let script = l2frame();
    let mut children = Vec::new();
    for name in listeners {
        let ns = lab.vm(name).ns.clone();
        let mut child = lab
            .spawn_piped(&ns, &["python3", &script, "recv", "eth0", marker, "2"])
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        assert_eq!(first.trim(), "ready", "receiver in {name} did not start");
        children.push((name.to_string(), child, out));
    }
    send();
    // Each receiver listens 2 s more from here (its stdin closing).
    for (_, child, _) in &mut children {
        drop(child.stdin.take());
    }
    let mut seen = BTreeMap::new();
    for (name, mut child, out) in children {
        let lines: Vec<String> = out
            .lines()
            .map_while(|l| l.ok())
            .filter(|l| l.starts_with("got"))
            .collect();
        child.wait().unwrap();
        seen.insert(name, lines);
    }
    seen
}

pub fn send_frame(
    lab: &Lab,
    from: &str,
    dst: &str,
    ethertype: &str,
    marker: &str,
    vlan: Option<u16>,
) {
    let ns = lab.vm(from).ns.clone();
    let script = l2frame();
    let vlan_s = vlan.map(|v| v.to_string());
    let mut argv = vec![
        "python3",
        script.as_str(),
        "send",
        "eth0",
        dst,
        ethertype,
        marker,
    ];
    if let Some(v) = &vlan_s {
        argv.push(v);
    }
    lab.exec(&ns, &argv).unwrap();
}

/// A valid IPv4/UDP packet from VM `from` (its own address) to `dst_ip` at `dst`
/// MAC, optionally inside an 802.1Q tag the guest sets itself.
pub fn send_ipv4(
    lab: &Lab,
    from: &str,
    ips: (std::net::Ipv4Addr, std::net::Ipv4Addr),
    dst: &str,
    marker: &str,
    vlan: Option<u16>,
) {
    let ns = lab.vm(from).ns.clone();
    let script = l2frame();
    let env = format!("HVX_IP={},{}", ips.0, ips.1);
    let vlan_s = vlan.map(|v| v.to_string());
    let mut argv = vec![
        "env", &env, "python3", &script, "send", "eth0", dst, "0800", marker,
    ];
    if let Some(v) = &vlan_s {
        argv.push(v);
    }
    lab.exec(&ns, &argv).unwrap();
}

pub fn ping(lab: &Lab, from: &str, ip: Ipv4Addr) -> bool {
    let ns = lab.vm(from).ns.clone();
    lab.exec(&ns, &["ping", "-c", "1", "-W", "2", &ip.to_string()])
        .is_ok()
}
