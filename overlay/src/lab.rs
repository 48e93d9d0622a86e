//! A throw-away multi-node lab on one machine, for the privileged tests and the
//! benchmark: an "underlay" namespace with a bridge, N "node" namespaces attached to
//! it by veth (each running its own [`Switch`]), and "VM" namespaces whose `eth0`
//! is a veth whose peer is the VM port on a node. Everything is named with a
//! unique prefix and removed on drop (processes in the namespaces are killed first),
//! even when a test fails.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::addr::Mac;
use crate::apply::Switch;
use crate::error::Result;
use crate::host::{Host, run};

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
pub struct LabNode {
    pub ns: String,
    pub vtep: Ipv4Addr,
    pub switch: Switch,
}

#[derive(Debug, Clone)]
pub struct LabVm {
    pub name: String,
    pub ns: String,
    pub mac: Mac,
    /// Host-side port name (lives in the node namespace that hosts the VM).
    pub port: String,
    pub node: usize,
}

#[derive(Debug)]
pub struct Lab {
    pub prefix: String,
    pub underlay_ns: String,
    pub underlay_mtu: u32,
    pub nodes: Vec<LabNode>,
    pub vms: Vec<LabVm>,
    pub state_root: PathBuf,
    namespaces: Vec<String>,
}

fn sh(argv: &[&str]) -> Result<String> {
    let v: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    run(&v, None)
}

impl Lab {
    /// `nodes` node namespaces on an underlay with the given MTU; node `i` has VTEP
    /// `192.168.77.<i+1>` (a private /24 that exists only inside these namespaces).
    pub fn new(nodes: usize, underlay_mtu: u32) -> Result<Lab> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("hxo{}x{n}", std::process::id() % 100_000);
        let state_root = std::env::temp_dir().join(format!("{prefix}-state"));
        let mut lab = Lab {
            underlay_ns: format!("{prefix}-ul"),
            prefix,
            underlay_mtu,
            nodes: Vec::new(),
            vms: Vec::new(),
            state_root,
            namespaces: Vec::new(),
        };
        lab.add_ns(&lab.underlay_ns.clone())?;
        let ul = lab.underlay_ns.clone();
        sh(&[
            "ip",
            "-n",
            &ul,
            "link",
            "add",
            "ul",
            "mtu",
            &underlay_mtu.to_string(),
            "type",
            "bridge",
        ])?;
        sh(&["ip", "-n", &ul, "link", "set", "ul", "up"])?;
        for i in 0..nodes {
            let ns = format!("{}-n{}", lab.prefix, i + 1);
            lab.add_ns(&ns)?;
            let vtep = Ipv4Addr::new(192, 168, 77, (i + 1) as u8);
            let peer = format!("un{}", i + 1);
            let mtu = underlay_mtu.to_string();
            sh(&[
                "ip", "-n", &ns, "link", "add", "ul0", "mtu", &mtu, "type", "veth", "peer", "name",
                &peer, "mtu", &mtu, "netns", &ul,
            ])?;
            sh(&["ip", "-n", &ul, "link", "set", &peer, "master", "ul", "up"])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{vtep}/24"),
                "dev",
                "ul0",
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", "ul0", "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            let host = Host::in_netns(ns.clone(), lab.state_root.join(format!("n{}", i + 1)));
            lab.nodes.push(LabNode {
                ns,
                vtep,
                switch: Switch::new(host),
            });
        }
        Ok(lab)
    }

    /// An extra namespace `<prefix>-<suffix>` (e.g. a VM pod), removed on drop.
    pub fn add_namespace(&mut self, suffix: &str) -> Result<String> {
        let ns = format!("{}-{suffix}", self.prefix);
        self.add_ns(&ns)?;
        Ok(ns)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        sh(&["ip", "netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        Ok(())
    }

    /// A "VM": namespace `<prefix>-<name>` whose `eth0` (with `mac`) is plugged into
    /// port `hvp<k>` on node `node` (not yet attached: the switch does that).
    pub fn add_vm(&mut self, name: &str, node: usize, mac: Mac) -> Result<LabVm> {
        let ns = format!("{}-{name}", self.prefix);
        self.add_ns(&ns)?;
        let port = format!("hvp{}", self.vms.len() + 1);
        let node_ns = self.nodes[node].ns.clone();
        sh(&[
            "ip", "-n", &node_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        sh(&[
            "ip",
            "-n",
            &ns,
            "link",
            "set",
            "eth0",
            "address",
            &mac.to_string(),
        ])?;
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        let vm = LabVm {
            name: name.to_string(),
            ns,
            mac,
            port,
            node,
        };
        self.vms.push(vm.clone());
        Ok(vm)
    }

    pub fn vm(&self, name: &str) -> &LabVm {
        // Tests ask only for VMs they added; a wrong name is a bug in the test.
        #[allow(clippy::expect_used)]
        self.vms
            .iter()
            .find(|v| v.name == name)
            .expect("no such lab VM")
    }

    /// Live-migration stand-in: the VM keeps its namespace, NIC and MAC; its port
    /// moves from the old node's namespace to the new one.
    pub fn move_vm(&mut self, name: &str, to: usize) -> Result<()> {
        let idx = self
            .vms
            .iter()
            .position(|v| v.name == name)
            .unwrap_or(usize::MAX);
        let Some(vm) = self.vms.get(idx).cloned() else {
            return Ok(());
        };
        let (from_ns, to_ns) = (self.nodes[vm.node].ns.clone(), self.nodes[to].ns.clone());
        sh(&[
            "ip", "-n", &from_ns, "link", "set", &vm.port, "netns", &to_ns,
        ])?;
        self.vms[idx].node = to;
        Ok(())
    }

    /// Runs a command in a namespace and returns stdout (error with stderr on failure).
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Result<String> {
        let mut v: Vec<&str> = vec!["ip", "netns", "exec", ns];
        v.extend_from_slice(argv);
        sh(&v)
    }

    /// Starts a background process in a namespace (killed on drop with the namespace).
    pub fn spawn(&self, ns: &str, argv: &[&str]) -> std::io::Result<Child> {
        self.spawn_with(ns, argv, Stdio::null())
    }

    /// Like [`Lab::spawn`] with a pipe to the process's stdin.
    pub fn spawn_piped(&self, ns: &str, argv: &[&str]) -> std::io::Result<Child> {
        self.spawn_with(ns, argv, Stdio::piped())
    }

    fn spawn_with(&self, ns: &str, argv: &[&str], stdin: Stdio) -> std::io::Result<Child> {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    }
}

/// Polls `f` until it is true or `timeout` passes; returns whether it became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

impl Lab {
    /// Gateway namespaces the nodes' switches made (`<node ns>-g<vni>`) that are
    /// still there.
    pub fn gateway_namespaces(&self) -> Vec<String> {
        let prefixes: Vec<&str> = self
            .nodes
            .iter()
            .map(|n| n.switch.host.gateway_netns_prefix.as_str())
            .collect();
        std::fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .filter(|n| {
                        prefixes
                            .iter()
                            .any(|p| crate::names::parse_gateway_netns(p, n).is_some())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A failed test may leave the switches' gateway namespaces (and dnsmasqs).
        let gateways = self.gateway_namespaces();
        self.namespaces.extend(gateways);
        for ns in self.namespaces.iter().rev() {
            if let Ok(pids) = sh(&["ip", "netns", "pids", ns]) {
                for pid in pids.split_whitespace() {
                    let _ = sh(&["kill", "-KILL", pid]);
                }
            }
        }
        for ns in self.namespaces.iter().rev() {
            // Processes just killed may hold the namespace for a moment.
            let ok = wait_until(Duration::from_secs(5), || {
                sh(&["ip", "netns", "del", ns]).is_ok()
            });
            if !ok {
                eprintln!("lab: could not delete netns {ns}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.state_root);
    }
}
