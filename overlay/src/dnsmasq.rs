//! dnsmasq configuration for a network's DHCP and DNS (pure rendering).
//!
//! Why dnsmasq rather than a Rust DHCP/DNS server: it is Debian's mature, small
//! (`dnsmasq-base`, no daemon scripts) implementation of exactly this job (DHCP with
//! reservations and options, authoritative local names, forwarding), already on
//! every node image, and it keeps serving while the agent restarts because it is a
//! separate daemon. The Rust crates available (dhcproto, hickory-dns) are protocol
//! libraries; a lease database, ARP probing and relay-free option handling would
//! have to be written and hardened here.
//!
//! One instance per network per node, bound only to the network's bridge
//! (`interface=` + `bind-interfaces`), so several networks and the node's own
//! resolver coexist. Reservations and names live in side files that a SIGHUP
//! re-reads; only a change of the main file needs a restart.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::plan::{MtuMode, MtuPlan};
use crate::spec::NetworkSpec;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsmasqConfig {
    /// `dnsmasq.conf`: changing it requires a restart.
    pub main: String,
    /// `dhcp-hosts`: `mac,ip,name` reservations (re-read on SIGHUP).
    pub dhcp_hosts: String,
    /// `hosts`: `ip name` records (re-read on SIGHUP).
    pub hosts: String,
    pub paths: DnsmasqPaths,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsmasqPaths {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub dhcp_hosts: PathBuf,
    pub hosts: PathBuf,
    pub leases: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
}

impl DnsmasqPaths {
    pub fn new(dir: &Path) -> Self {
        DnsmasqPaths {
            dir: dir.to_path_buf(),
            conf: dir.join("dnsmasq.conf"),
            dhcp_hosts: dir.join("dhcp-hosts"),
            hosts: dir.join("hosts"),
            leases: dir.join("leases"),
            pid: dir.join("dnsmasq.pid"),
            log: dir.join("dnsmasq.log"),
        }
    }
}

pub fn render(spec: &NetworkSpec, bridge: &str, mtu: &MtuPlan, dir: &Path) -> DnsmasqConfig {
    let paths = DnsmasqPaths::new(dir);
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# hvx network {} (vni {}); generated, do not edit",
        spec.name, spec.vni
    );
    let _ = writeln!(
        c,
        "interface={bridge}\nbind-interfaces\nexcept-interface=lo"
    );
    let _ = writeln!(c, "no-resolv\nno-hosts\nno-poll\ndhcp-authoritative");
    let _ = writeln!(c, "pid-file={}", paths.pid.display());
    let _ = writeln!(c, "dhcp-leasefile={}", paths.leases.display());
    let _ = writeln!(c, "dhcp-hostsfile={}", paths.dhcp_hosts.display());
    let _ = writeln!(c, "addn-hosts={}", paths.hosts.display());
    let _ = writeln!(c, "log-facility={}", paths.log.display());
    if let Some(d) = &spec.dns.domain {
        // Names in the domain are authoritative here: never forwarded upstream.
        let _ = writeln!(c, "domain={d}\nlocal=/{d}/\nexpand-hosts");
    }
    for u in &spec.dns.upstream {
        let _ = writeln!(c, "server={u}");
    }
    for (i, s) in spec.subnets.iter().enumerate() {
        let tag = format!("s{i}");
        let mask = s.cidr.netmask();
        match &s.dhcp {
            Some(r) => {
                let _ = writeln!(
                    c,
                    "dhcp-range=set:{tag},{},{},{mask},{}",
                    r.start, r.end, r.lease_secs
                );
            }
            // Reservations only: a static range serves dhcp-host entries and nothing else.
            None => {
                let _ = writeln!(
                    c,
                    "dhcp-range=set:{tag},{},static,{mask},3600",
                    s.cidr.network().addr
                );
            }
        }
        let _ = writeln!(c, "dhcp-option=tag:{tag},option:router,{}", s.gateway);
        let _ = writeln!(c, "dhcp-option=tag:{tag},option:dns-server,{}", s.gateway);
        if let Some(d) = &spec.dns.domain {
            let _ = writeln!(c, "dhcp-option=tag:{tag},option:domain-name,{d}");
        }
        // Forced: many clients (Windows, busybox) do not request option 26.
        if mtu.mode == MtuMode::Reduced {
            let _ = writeln!(c, "dhcp-option-force=tag:{tag},option:mtu,{}", mtu.link_mtu);
        }
    }

    let mut dhcp_hosts = String::new();
    let mut hosts = String::new();
    let mut reserved: Vec<(String, Ipv4Addr, Option<String>)> = spec
        .members
        .iter()
        .filter_map(|m| m.ip.map(|ip| (m.mac.to_string(), ip, Some(m.vm.clone()))))
        .collect();
    for s in &spec.subnets {
        for r in &s.reservations {
            reserved.push((r.mac.to_string(), r.ip, r.hostname.clone()));
        }
    }
    for (mac, ip, name) in &reserved {
        match name {
            Some(n) => {
                let _ = writeln!(dhcp_hosts, "{mac},{ip},{n}");
                let _ = writeln!(hosts, "{ip} {n}");
            }
            None => {
                let _ = writeln!(dhcp_hosts, "{mac},{ip}");
            }
        }
    }
    for r in &spec.dns.records {
        let _ = writeln!(hosts, "{} {}", r.ip, r.name);
    }
    DnsmasqConfig {
        main: c,
        dhcp_hosts,
        hosts,
        paths,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan_mtu, tests::sample};

    #[test]
    fn renders_reservations_names_and_options() {
        let d = render(
            &sample(),
            "hvb4242",
            &plan_mtu(1600),
            Path::new("/run/hvx/4242"),
        );
        assert!(d.main.contains("interface=hvb4242\nbind-interfaces"));
        assert!(
            d.main
                .contains("dhcp-range=set:s0,10.50.0.100,10.50.0.150,255.255.255.0,3600")
        );
        assert!(
            d.main
                .contains("dhcp-option=tag:s0,option:router,10.50.0.1")
        );
        assert!(d.main.contains("domain=app.internal\nlocal=/app.internal/"));
        assert!(d.main.contains("pid-file=/run/hvx/4242/dnsmasq.pid"));
        assert!(!d.main.contains("option:mtu"));
        assert!(!d.main.contains("server="));
        assert_eq!(
            d.dhcp_hosts,
            "00:50:56:00:00:01,10.50.0.11,web\n00:50:56:00:00:02,10.50.0.12,db\n"
        );
        assert!(d.hosts.contains("10.50.0.12 db\n") && d.hosts.contains("10.50.0.11 api\n"));
    }

    #[test]
    fn reduced_mtu_is_pushed_by_dhcp_and_static_only_subnets_work() {
        let mut spec = sample();
        spec.subnets[0].dhcp = None;
        spec.dns.upstream = vec!["10.99.0.53".parse().unwrap()];
        let d = render(&spec, "hvb4242", &plan_mtu(1500), Path::new("/s"));
        assert!(d.main.contains("option:mtu,1450"));
        assert!(
            d.main
                .contains("dhcp-range=set:s0,10.50.0.0,static,255.255.255.0")
        );
        assert!(d.main.contains("server=10.99.0.53"));
    }
}
