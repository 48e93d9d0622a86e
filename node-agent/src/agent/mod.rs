//! The node agent (`hvx-node-agent`): serves the operator's gRPC contract
//! (`node-agent/proto/agent.proto`) on one node, over the disk store
//! (`hvx-storage`), the overlay switch (`hvx-overlay`) and the VMs' run dirs (written
//! by their launchers).
//!
//! State is on disk, keyed by Kubernetes UIDs, so a restarted agent finds it again:
//! the last EnsureNetwork of each network (`agent/networks/<vni>.pb`, re-applied at
//! start, so a rebooted node carries its networks before the operator calls) and the
//! digest each OverlayDisk was imported as (`agent/disks/<uid>.json`). VMs run in
//! their own launcher pods and never depend on the agent process being up.

pub mod authority_shim;
pub mod bases;
pub mod convert;
pub mod csi;
pub mod deviceplugin;
pub mod disks;
pub mod error;
pub mod http_policy;
pub mod label;
pub mod lease;
pub mod metrics;
pub mod migration;
pub mod moves;
pub mod network;
pub mod plugin_registration;
pub mod prereq;
pub mod replica;
pub mod server;
pub mod taps;
pub mod uploads;
pub mod vms;

use error::AgentError;
use hvx_api::node::NodePaths;
use hvx_overlay::{Host, Switch};
use hvx_proto::v1 as pb;
use hvx_storage::{DiskStore, StoreConfig};
use hvx_vmm::AcceleratorReport;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Settings from the command line.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's name.
    pub node_name: String,
    /// This node's address: VTEP and where the operator dials.
    pub node_ip: Ipv4Addr,
    /// Persistent root (`/var/lib/hvx`).
    pub store_root: PathBuf,
    /// Runtime root (`/run/hvx`).
    pub run_root: PathBuf,
    /// MTU of the underlay between nodes.
    pub underlay_mtu: u32,
    /// Destinations guests never reach through egress NAT (the cluster's pod and
    /// service CIDRs); link-local 169.254.0.0/16 is always denied by the overlay.
    pub egress_denied: Vec<hvx_overlay::Ipv4Net>,
    /// Exceptions to the denied ranges, checked first.
    pub egress_allowed: Vec<hvx_overlay::Ipv4Net>,
    /// Where `http` disk sources may be fetched from.
    pub http_policy: hvx_storage::egress::HttpPolicy,
    /// Bytes all disk uploads held on this node may take together, each counted at its
    /// declared total (`None`: only the store's free space limits them).
    pub upload_capacity_bytes: Option<u64>,
}

impl AgentConfig {
    /// A node's settings with everything but its identity and roots at the defaults
    /// of a node without policies: underlay MTU 1500, no egress exceptions, the default
    /// `http` source policy, uploads limited only by free space.
    pub fn new(node_name: &str, node_ip: Ipv4Addr, store_root: PathBuf, run_root: PathBuf) -> Self {
        Self {
            node_name: node_name.into(),
            node_ip,
            store_root,
            run_root,
            underlay_mtu: 1500,
            egress_denied: Vec::new(),
            egress_allowed: Vec::new(),
            http_policy: Default::default(),
            upload_capacity_bytes: None,
        }
    }

    /// Adds this node's egress policy to a network spec built from a request.
    pub fn with_egress_policy(
        &self,
        mut spec: hvx_overlay::NetworkSpec,
    ) -> hvx_overlay::NetworkSpec {
        spec.egress_denied = self.egress_denied.clone();
        spec.egress_allowed = self.egress_allowed.clone();
        spec
    }
}

/// Shared state of the agent.
#[derive(Debug)]
pub struct Agent {
    /// Settings.
    pub config: AgentConfig,
    /// Node directories.
    pub paths: NodePaths,
    /// The disk store.
    pub store: Arc<DiskStore>,
    /// The overlay switch.
    pub switch: Switch,
    /// The accelerator probe's answer, once it finished.
    pub accel: Mutex<Option<AcceleratorReport>>,
    /// Imports in progress, by OverlayDisk UID: their latest progress.
    pub imports: Mutex<HashMap<String, watch::Receiver<pb::DiskProgress>>>,
    /// One lock per object (`net/<vni>`, `overlay/<vm>/<disk>`): calls on the same
    /// object serialise instead of racing.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Outgoing live migrations by migration UID.
    pub migrations: Mutex<HashMap<String, migration::Running>>,
    /// Replica daemons this agent runs, by `<vm key>.<disk>`.
    pub replicas: Mutex<HashMap<String, replica::Serving>>,
    /// RPC counters by (method, code) for /metrics.
    pub rpc_counts: Mutex<HashMap<(String, String), u64>>,
    /// The latest node prerequisite report (`prereq`), for /metrics.
    pub prereq: Mutex<Option<hvx_api::prereq::Report>>,
}

impl Agent {
    /// Opens the store and the switch for this node.
    pub fn open(config: AgentConfig) -> Result<Self, AgentError> {
        let paths = NodePaths::new(&config.store_root, &config.run_root, &config.node_name);
        for dir in [
            paths.agent_state().join("networks"),
            paths.agent_state().join("disks"),
            paths.vms_dir(),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(AgentError::io(format!("creating {}", dir.display())))?;
        }
        let mut store_config = StoreConfig::new(paths.disk_store());
        store_config.http_policy = config.http_policy.clone();
        let store = DiskStore::open(store_config)?;
        let switch = Switch::new(Host::new(paths.overlay_state()));
        Ok(Self {
            config,
            paths,
            store: Arc::new(store),
            switch,
            accel: Mutex::default(),
            imports: Mutex::default(),
            locks: Mutex::default(),
            migrations: Mutex::default(),
            replicas: Mutex::default(),
            rpc_counts: Mutex::default(),
            prereq: Mutex::default(),
        })
    }

    /// The lock of one object.
    pub async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone();
        m.lock_owned().await
    }

    /// Counts one finished call for /metrics.
    pub fn count(&self, method: &str, code: tonic::Code) {
        *self
            .rpc_counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((method.to_string(), format!("{code:?}")))
            .or_default() += 1;
    }
}

/// Writes `bytes` to `path` atomically (temp file in the same dir, fsync, rename).
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), AgentError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)
        .map_err(AgentError::io(format!("writing {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(AgentError::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(AgentError::io(format!("renaming to {}", path.display())))
}

/// Removes a file; already gone is fine.
pub fn remove_file(path: &std::path::Path) -> Result<(), AgentError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::Io {
            what: format!("removing {}", path.display()),
            source: e,
        }),
    }
}

/// Runs blocking host work (the overlay switch runs `ip`, `bridge`, `nft`) off the
/// async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Io {
            what: "background task".into(),
            source: std::io::Error::other(e.to_string()),
        })?
}
