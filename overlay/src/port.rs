//! Plumbing of one VM NIC from its pod to the node's bridge, the same way KubeVirt's
//! bridge binding does it (this kernel has no macvtap and no vhost-net):
//!
//! ```text
//! node netns:  hvb<vni> ── hvp<hash>  (veth, the switch port)
//!                              │
//! pod netns:           hvk0 (veth) ── hvk0br (bridge) ── hvk0tap (tap, QEMU's NIC)
//! ```
//!
//! The guest MAC never appears on the veth or the pod bridge as their own address,
//! so the guest owns its MAC end to end. Creation is idempotent; removal deletes
//! the veth pair (the pod side goes with it) and the pod's bridge and tap.

use sha2::{Digest, Sha256};

use crate::error::OverlayError;
use crate::error::Result;
use crate::host::{Host, run};
use crate::spec::check_ifname;

/// Names of one NIC's links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNic {
    /// Switch port in the node namespace (`hvp` + 10 hex of the NIC identity).
    pub host_if: String,
    /// veth end inside the pod.
    pub pod_if: String,
    /// Bridge inside the pod joining the veth and the tap.
    pub pod_bridge: String,
    /// The tap QEMU opens (`-netdev tap,ifname=<tap>,script=no,downscript=no`).
    pub tap: String,
    pub mtu: u32,
}

impl PodNic {
    /// Deterministic names from the VM's identity (namespace/name or UID) and NIC
    /// index, so a restarted agent or launcher finds the same links.
    pub fn new(vm_identity: &str, nic_index: u8, mtu: u32) -> PodNic {
        let digest = Sha256::digest(format!("{vm_identity}/{nic_index}").as_bytes());
        let hex: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
        PodNic {
            host_if: format!("hvp{hex}"),
            pod_if: format!("hvk{nic_index}"),
            pod_bridge: format!("hvk{nic_index}br"),
            tap: format!("hvk{nic_index}tap"),
            mtu,
        }
    }

    /// Commands (each an argv) creating the plumbing for a pod whose network
    /// namespace is the named netns `pod_netns`. Run by [`attach_pod_nic`].
    pub fn create_commands(&self, node: &Host, pod_netns: &str) -> Vec<Vec<String>> {
        let mtu = self.mtu.to_string();
        let pod = Host::in_netns(pod_netns, &node.state_root);
        vec![
            node.ip_argv(&[
                "link",
                "add",
                &self.host_if,
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                &self.pod_if,
                "mtu",
                &mtu,
                "netns",
                pod_netns,
            ]),
            pod.ip_argv(&[
                "link",
                "add",
                &self.pod_bridge,
                "mtu",
                &mtu,
                "type",
                "bridge",
            ]),
            pod.ip_argv(&["link", "set", &self.pod_bridge, "addrgenmode", "none"]),
            pod.ip_argv(&["tuntap", "add", "dev", &self.tap, "mode", "tap"]),
            pod.ip_argv(&[
                "link",
                "set",
                &self.tap,
                "mtu",
                &mtu,
                "master",
                &self.pod_bridge,
                "up",
            ]),
            pod.ip_argv(&[
                "link",
                "set",
                &self.pod_if,
                "master",
                &self.pod_bridge,
                "up",
            ]),
            pod.ip_argv(&["link", "set", &self.pod_bridge, "up"]),
            node.ip_argv(&["link", "set", &self.host_if, "up"]),
        ]
    }
}

/// Creates the plumbing unless the switch port already exists (idempotent). The
/// switch attaches `host_if` to the network's bridge on its next apply.
pub fn attach_pod_nic(node: &Host, pod_netns: &str, nic: &PodNic) -> Result<()> {
    for name in [&nic.host_if, &nic.pod_if, &nic.pod_bridge, &nic.tap] {
        check_ifname(name).map_err(|reason| OverlayError::InvalidSpec {
            network: String::new(),
            reason: format!("interface {name}: {reason}"),
        })?;
    }
    let exists = run(&node.ip_argv(&["link", "show", "dev", &nic.host_if]), None).is_ok();
    if exists {
        return Ok(());
    }
    for argv in nic.create_commands(node, pod_netns) {
        if let Err(e) = run(&argv, None) {
            // Leave nothing half-built behind.
            let _ = detach_pod_nic(node, pod_netns, nic);
            return Err(e);
        }
    }
    Ok(())
}

/// Deletes the plumbing; what is already gone counts as removed.
pub fn detach_pod_nic(node: &Host, pod_netns: &str, nic: &PodNic) -> Result<()> {
    let pod = Host::in_netns(pod_netns, &node.state_root);
    let mut errors = Vec::new();
    for (host, name) in [
        (node, &nic.host_if),
        (&pod, &nic.tap),
        (&pod, &nic.pod_bridge),
    ] {
        if run(&host.ip_argv(&["link", "show", "dev", name]), None).is_ok()
            && let Err(e) = run(&host.ip_argv(&["link", "del", "dev", name]), None)
        {
            errors.push(e.to_string());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(OverlayError::Teardown {
            what: format!("pod NIC {}", nic.host_if),
            count: errors.len(),
            messages: errors.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_deterministic_and_fit() {
        let a = PodNic::new("default/web-0", 0, 1500);
        assert_eq!(a, PodNic::new("default/web-0", 0, 1500));
        assert_ne!(a.host_if, PodNic::new("default/web-0", 1, 1500).host_if);
        assert!(a.host_if.starts_with("hvp") && a.host_if.len() == 13);
        assert!(crate::names::parse_owned_link(&a.host_if).is_none());
        for n in [&a.host_if, &a.pod_if, &a.pod_bridge, &a.tap] {
            assert!(check_ifname(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn commands_cross_namespaces() {
        let nic = PodNic::new("vm", 0, 1450);
        let cmds = nic.create_commands(&Host::in_netns("node", "/s"), "pod1");
        assert_eq!(cmds[0][..4], ["ip", "-n", "node", "link"]);
        assert!(cmds[0].ends_with(&["netns".to_string(), "pod1".to_string()]));
        assert!(cmds[0].contains(&"1450".to_string()));
        assert!(
            cmds.iter()
                .any(|c| c.contains(&"tuntap".to_string()) && c[2] == "pod1")
        );
    }
}
