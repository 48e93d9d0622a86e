//! Where hvx keeps things on a node. The agent, the launcher and the operator compute
//! these paths and names independently, so they live here, pure and pinned by tests.
//!
//! Everything is below `<root>/nodes/<node name>/`: the host paths the chart mounts
//! (`/var/lib/hvx`, `/run/hvx`) may be shared between nodes (the local test cluster
//! runs its nodes on one host; some clouds put hostPath on shared storage), and an
//! agent must never see another node's store, sockets or dnsmasq pid files.

use crate::launch::fnv1a;
use std::path::{Path, PathBuf};

/// Default persistent root (the chart's `hostPath` for the disk store).
pub const DEFAULT_STORE_ROOT: &str = "/var/lib/hvx";
/// Default runtime root (sockets, pid files, VM run dirs).
pub const DEFAULT_RUN_ROOT: &str = "/run/hvx";
/// Default gRPC port of the agent (host network).
pub const AGENT_PORT: u16 = 9443;
/// Default Prometheus metrics port of the agent (host network).
pub const AGENT_METRICS_PORT: u16 = 9444;
/// A node's hvx directories.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePaths {
    store: PathBuf,
    run: PathBuf,
}

impl NodePaths {
    /// Paths of `node` below the given roots.
    pub fn new(store_root: &Path, run_root: &Path, node: &str) -> Self {
        Self {
            store: store_root.join("nodes").join(node),
            run: run_root.join("nodes").join(node),
        }
    }

    /// Everything hvx keeps on this node's disk (stores, state, the agent's identity).
    pub fn node_dir(&self) -> &Path {
        &self.store
    }

    /// Root of the node's disk store (`hvx_storage::DiskStore`): bases and overlays.
    pub fn disk_store(&self) -> PathBuf {
        self.store.join("store")
    }

    /// Persistent agent state (last desired state of each network, re-applied at
    /// start so a rebooted node comes back without waiting for the operator).
    pub fn agent_state(&self) -> PathBuf {
        self.store.join("agent")
    }

    /// State root of the overlay switch (`hvx_overlay::Host`): dnsmasq configs,
    /// leases and pid files.
    pub fn overlay_state(&self) -> PathBuf {
        self.run.join("overlay")
    }

    /// Run dir of one VM: QMP socket, serial console, `status.json`.
    pub fn vm_run_dir(&self, vm_id: &str) -> PathBuf {
        self.run.join("vms").join(vm_key(vm_id))
    }

    /// Directory of the agent's Unix sockets that launchers use. A directory, not the
    /// socket file, is what a launcher pod gets mounted (the `vm.hvx.dev` CSI volume):
    /// a restarted agent makes a new socket inode, which a file mount would miss.
    pub fn launcher_socket_dir(&self) -> PathBuf {
        self.run.join("launcher-api")
    }

    /// The agent's Unix socket where launchers have their launch spec's seal checked
    /// (`hvx-node-agent`'s `sealcheck`).
    pub fn seal_socket(&self) -> PathBuf {
        self.launcher_socket_dir().join("seal.sock")
    }

    /// Parent of every VM run dir (the agent lists it to find running VMs).
    pub fn vms_dir(&self) -> PathBuf {
        self.run.join("vms")
    }
}

/// Short, path- and DNS-safe key of a VM identity (`<app uid>/<vm>`): `vm-` + 12 hex.
pub fn vm_key(vm_id: &str) -> String {
    format!("vm-{:012x}", fnv1a(vm_id) & 0xffff_ffff_ffff)
}

/// Where the overlay of one VM disk lives in the disk store: (namespace, name) for
/// `DiskStore::create_disk`. VM disk names are DNS labels (CRD pattern).
pub fn vm_overlay_ref(vm_id: &str, disk: &str) -> (String, String) {
    (vm_key(vm_id), disk.to_string())
}

/// The node agent's CSI driver that mounts a VM's own directories into its launcher
/// pod (CSI ephemeral inline volumes; the chart's CSIDriver object).
pub const VM_CSI_DRIVER: &str = "vm.hvx.dev";
/// Its volume attribute naming the tree a volume carries: `store` (below the store
/// root) or `run` (below the run root).
pub const VM_CSI_TREE: &str = "hvx.dev/tree";

/// The extended resource every launcher pod requests one unit of: the node agent's
/// device plugin hands out `/dev/kvm` with it where KVM works (nothing on TCG nodes),
/// so launchers need no privilege for it.
pub const KVM_DEVICE_RESOURCE: &str = "devices.hvx.dev/kvm";

/// Directory in a VM's run dir holding the TLS-PSK key of a migration in progress.
pub const MIGRATION_TLS_DIR: &str = "migration-tls";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_per_node_and_pinned() {
        let p = NodePaths::new(Path::new("/var/lib/hvx"), Path::new("/run/hvx"), "n1");
        assert_eq!(p.disk_store(), Path::new("/var/lib/hvx/nodes/n1/store"));
        assert_eq!(p.overlay_state(), Path::new("/run/hvx/nodes/n1/overlay"));
        let q = NodePaths::new(Path::new("/var/lib/hvx"), Path::new("/run/hvx"), "n2");
        assert_ne!(p.vm_run_dir("u/web"), q.vm_run_dir("u/web"));
        // Pinned: a change would orphan run dirs and overlays across an upgrade.
        assert_eq!(
            vm_key("u/web"),
            format!("vm-{:012x}", fnv1a("u/web") & 0xffff_ffff_ffff)
        );
        assert_eq!(vm_key("u/web").len(), 15);
        assert_ne!(vm_key("u/web"), vm_key("u/db"));
        assert_eq!(vm_overlay_ref("u/web", "root").1, "root");
    }
}
