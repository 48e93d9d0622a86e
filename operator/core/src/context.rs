//! Shared state of the controllers.

use crate::agents::{AgentPool, AgentSettings};
use hvx_api::OverlayDisk;
use hvx_api::migration::VmMigration;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Settings from flags and the Helm chart.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Image of the VM launcher pods.
    pub launcher_image: String,
    /// Pull policy for it (`Never` on clusters loaded without a registry).
    pub image_pull_policy: String,
    /// CPU request per vCPU in millicores. 1000 reserves a core per vCPU; lower values
    /// overcommit (TCG test clusters).
    pub cpu_millis_per_vcpu: u32,
    /// Node label selecting nodes whose agent is ready.
    pub require_agent_label: bool,
    /// How node agents are reached.
    pub agents: AgentSettings,
    /// The disk upload endpoint this process serves, if enabled.
    pub upload: Option<UploadSettings>,
    /// Parallel live migrations.
    pub migrations: MigrationLimits,
    /// Objects of one kind reconciled at once.
    pub reconcile_concurrency: u16,
    /// Retry intervals and deadlines.
    pub timings: Timings,
    /// The key launcher pod metadata is sealed with (the Helm chart's Secret, which
    /// the agents hold too). None: a key made for this process (tests; no agent can
    /// then check a launcher's spec, so launchers refuse to start).
    pub seal_key: Option<hvx_api::seal::SealKey>,
    /// The namespace hvx runs in: node agents' Leases and records of cleanup owed to
    /// lost nodes live there.
    pub namespace: String,
    /// When a node counts as lost.
    pub liveness: crate::liveness::LivenessSettings,
}

/// Retry intervals and deadlines of the controllers, in seconds (flags of the binary,
/// values of the Helm chart's `operator.extraArgs`; defaults in `defaults`).
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct Timings {
    /// Seconds before a failed disk import is tried again (the agent refuses a hostile
    /// image before any tool runs, so retrying is cheap).
    #[arg(long, env = "HVX_IMPORT_RETRY_SECONDS", default_value_t = defaults::IMPORT_RETRY_SECONDS)]
    pub import_retry_seconds: u64,
    /// Seconds a live migration's target may take to listen before the migration
    /// fails (no node has room, an image cannot be pulled).
    #[arg(long, env = "HVX_MIGRATION_SCHEDULING_TIMEOUT_SECONDS", default_value_t = defaults::MIGRATION_SCHEDULING_TIMEOUT_SECONDS)]
    pub migration_scheduling_timeout_seconds: u64,
    /// Seconds before a failed cold disk move is tried again.
    #[arg(long, env = "HVX_DISK_MOVE_RETRY_SECONDS", default_value_t = defaults::DISK_MOVE_RETRY_SECONDS)]
    pub disk_move_retry_seconds: u64,
    /// Seconds without data from the source node after which a cold disk move fails.
    #[arg(long, env = "HVX_DISK_MOVE_IDLE_SECONDS", default_value_t = defaults::DISK_MOVE_IDLE_SECONDS)]
    pub disk_move_idle_seconds: u64,
    /// Seconds between two looks for networks left on nodes that no VirtualNetwork
    /// owns (one is deleted when two looks in a row find it).
    #[arg(long, env = "HVX_ORPHAN_SWEEP_SECONDS", default_value_t = defaults::ORPHAN_SWEEP_SECONDS)]
    pub orphan_sweep_seconds: u64,
    /// Seconds between two looks at cleanup owed to lost nodes (replayed once their
    /// agent is back); also how often every node's liveness is observed.
    #[arg(long, env = "HVX_OWED_REPLAY_SECONDS", default_value_t = defaults::OWED_REPLAY_SECONDS)]
    pub owed_replay_seconds: u64,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            import_retry_seconds: defaults::IMPORT_RETRY_SECONDS,
            migration_scheduling_timeout_seconds: defaults::MIGRATION_SCHEDULING_TIMEOUT_SECONDS,
            disk_move_retry_seconds: defaults::DISK_MOVE_RETRY_SECONDS,
            disk_move_idle_seconds: defaults::DISK_MOVE_IDLE_SECONDS,
            orphan_sweep_seconds: defaults::ORPHAN_SWEEP_SECONDS,
            owed_replay_seconds: defaults::OWED_REPLAY_SECONDS,
        }
    }
}

impl Timings {
    /// `seconds` as a Duration, at least a second (0 would spin).
    pub fn secs(seconds: u64) -> std::time::Duration {
        std::time::Duration::from_secs(seconds.max(1))
    }
}

/// How many live migrations may run at once.
#[derive(Clone, Debug)]
pub struct MigrationLimits {
    /// Leaving one node.
    pub per_node: usize,
    /// In the whole cluster.
    pub total: usize,
}

pub use crate::defaults;

impl Default for MigrationLimits {
    fn default() -> Self {
        Self {
            per_node: defaults::MIGRATIONS_PER_NODE,
            total: defaults::MIGRATIONS_TOTAL,
        }
    }
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            launcher_image: defaults::LAUNCHER_IMAGE.into(),
            image_pull_policy: defaults::IMAGE_PULL_POLICY.into(),
            cpu_millis_per_vcpu: defaults::CPU_MILLIS_PER_VCPU,
            require_agent_label: true,
            agents: AgentSettings::default(),
            upload: None,
            migrations: MigrationLimits::default(),
            reconcile_concurrency: defaults::RECONCILE_CONCURRENCY,
            timings: Timings::default(),
            seal_key: None,
            namespace: defaults::NAMESPACE.into(),
            liveness: crate::liveness::LivenessSettings::default(),
        }
    }
}

/// What every reconcile gets.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Settings.
    pub config: OperatorConfig,
    /// Event recorder identity.
    pub reporter: Reporter,
    /// Node agent clients.
    pub agents: AgentPool,
    /// Disk imports this operator follows, by (node, OverlayDisk uid).
    pub imports: Mutex<HashMap<(String, String), ImportState>>,
    /// Guest addresses the agents' DHCP servers handed out: (network uid, node,
    /// MAC) -> IP, replaced per network and node at every sync.
    pub leases: Mutex<HashMap<(String, String, String), String>>,
    /// TLS pre-shared keys of migrations in flight, by VmMigration UID (memory only).
    pub migration_keys: Mutex<HashMap<String, Vec<u8>>>,
    /// Migrations whose progress stream a task of this process follows.
    pub migrations_followed: Mutex<HashMap<String, FollowedMigration>>,
    /// Wakes the migration controller for one migration (its progress task heard
    /// something); the controller takes the receiver at start.
    pub migration_wakeups: tokio::sync::mpsc::UnboundedSender<ObjectRef<VmMigration>>,
    /// The receiving end of `migration_wakeups`, until the controller takes it.
    pub migration_wakeups_rx:
        Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<ObjectRef<VmMigration>>>>,
    /// Wakes the OverlayDisk controller for one disk (an import it follows moved on);
    /// the controller takes the receiver at start.
    pub disk_wakeups: tokio::sync::mpsc::UnboundedSender<ObjectRef<OverlayDisk>>,
    /// The receiving end of `disk_wakeups`, until the controller takes it.
    pub disk_wakeups_rx:
        Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<ObjectRef<OverlayDisk>>>>,
    /// Cold disk moves this operator runs, by move id (`hvx_operator::diskmove`).
    pub disk_moves: Mutex<HashMap<String, MoveState>>,
    /// Prometheus counters.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// The shared watch caches every pass reads instead of the API server.
    pub stores: crate::stores::Stores,
    /// The VmApplication status this process last wrote, by UID (`vmapp::apply`).
    pub app_status: Mutex<HashMap<String, hvx_api::VmApplicationStatus>>,
    /// Consecutive failed passes per object (kind/namespace/name), for the backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// What this process last saw of each node's Lease and Ready condition, timed by
    /// its own clock (`liveness`).
    pub node_seen: Mutex<HashMap<String, crate::liveness::Seen>>,
}

/// A disk import on one node, as this operator last saw it. The task following the
/// agent's PrepareDisk stream records here and wakes the OverlayDisk controller, which
/// writes the disk's status from it (one writer; `hvx_operator::disk`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImportState {
    /// The PrepareDisk stream is open.
    Running(ImportProgress),
    /// The base is on the node.
    Ready(ImportDone),
    /// It failed; retried after a while (the agent validates before any tool runs,
    /// so a hostile image fails the same way every time, cheaply).
    Failed {
        /// Why.
        message: String,
        /// When.
        at: std::time::Instant,
    },
}

/// The last progress an import reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportProgress {
    /// The agent waits for uploaded bytes (not yet importing).
    pub waiting_for_upload: bool,
    /// For people: "downloading 40% (400/1000 MiB)".
    pub text: String,
    /// Bytes read so far.
    pub bytes_done: u64,
    /// Bytes to read, when known.
    pub bytes_total: u64,
}

/// What a finished import made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportDone {
    /// "sha256:<hex>" of the base.
    pub digest: String,
    /// Guest-visible size.
    pub virtual_bytes: u64,
    /// Bytes the base takes on the node.
    pub actual_bytes: u64,
    /// Bytes read from the source.
    pub bytes_total: u64,
    /// The source's format as detected.
    pub format: String,
    /// How long it took.
    pub seconds: u64,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// Shared state recording into `metrics` (served by the binary from start-up, before
    /// leader election, so probes and scrapes work on every replica).
    pub fn with_metrics(
        client: Client,
        config: OperatorConfig,
        reporter: Reporter,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
        stores: crate::stores::Stores,
    ) -> Self {
        let (wakeups, wakeups_rx) = tokio::sync::mpsc::unbounded_channel();
        let (disk_wakeups, disk_wakeups_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            agents: AgentPool::new(config.agents.clone()),
            client,
            config,
            reporter,
            imports: Mutex::default(),
            leases: Mutex::default(),
            migration_keys: Mutex::default(),
            migrations_followed: Mutex::default(),
            migration_wakeups: wakeups,
            migration_wakeups_rx: Mutex::new(Some(wakeups_rx)),
            disk_wakeups,
            disk_wakeups_rx: Mutex::new(Some(disk_wakeups_rx)),
            disk_moves: Mutex::default(),
            metrics,
            stores,
            app_status: Mutex::default(),
            failures: Mutex::default(),
            node_seen: Mutex::default(),
        }
    }

    /// A recorder for events about objects.
    pub fn recorder(&self) -> Recorder {
        Recorder::new(self.client.clone(), self.reporter.clone())
    }
}

/// Upload endpoint settings.
#[derive(Clone, Debug)]
pub struct UploadSettings {
    /// Largest disk accepted.
    pub max_bytes: u64,
    /// What the endpoint last stored of each upload, read by the disk reconcile.
    pub book: UploadBook,
}

/// What the upload endpoint last stored of one upload (on the agents' stores).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UploadProgress {
    /// Bytes every copy holds durably.
    pub bytes_done: u64,
    /// Declared total.
    pub bytes_total: u64,
    /// Every copy is complete.
    pub complete: bool,
    /// The nodes holding a copy.
    pub nodes: Vec<String>,
    /// Hex sha256 of the upload, once complete.
    pub sha256: String,
}

/// Upload progress by disk UID, in memory (like `Context::imports`): the endpoint
/// records, the OverlayDisk reconcile (the one writer of the disk's status) reads. It
/// is created before the controllers (the endpoint serves on every replica), so the
/// wake-ups go through its own channel, which the controller takes at start.
#[derive(Clone)]
pub struct UploadBook {
    progress: Arc<Mutex<HashMap<String, UploadProgress>>>,
    wake_tx: tokio::sync::mpsc::UnboundedSender<DiskName>,
    wake_rx: Arc<Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<DiskName>>>>,
}

/// An OverlayDisk's (namespace, name).
pub type DiskName = (String, String);

impl Default for UploadBook {
    fn default() -> Self {
        let (wake_tx, wake_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            progress: Arc::default(),
            wake_tx,
            wake_rx: Arc::new(Mutex::new(Some(wake_rx))),
        }
    }
}

impl std::fmt::Debug for UploadBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UploadBook")
    }
}

impl UploadBook {
    /// Records `uid`'s progress and wakes the reconcile of OverlayDisk `ns/name`.
    pub fn record(&self, ns: &str, name: &str, uid: &str, p: UploadProgress) {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.to_string(), p);
        let _ = self.wake_tx.send((ns.to_string(), name.to_string()));
    }

    /// Records what the agents answered (a restarted operator), without a wake-up.
    pub fn learn(&self, uid: &str, p: UploadProgress) {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.to_string(), p);
    }

    /// The last recorded progress of `uid`.
    pub fn get(&self, uid: &str) -> Option<UploadProgress> {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .cloned()
    }

    /// Forgets `uid` (its OverlayDisk is gone).
    pub fn forget(&self, uid: &str) {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    /// The wake-ups (namespace, name), once: for the OverlayDisk controller.
    pub fn take_wakeups(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<(String, String)>> {
        self.wake_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// A move as this operator last saw it, by move id (the launcher pod's UID).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoveState {
    /// Relaying: progress text.
    Running(String),
    /// Every disk is installed on the new node.
    Done,
    /// It failed; retried after a while (`diskmove`).
    Failed {
        /// Why.
        message: String,
        /// When.
        at: Instant,
    },
}

/// What the task following a live migration's progress stream last heard. The task
/// only records here (and wakes the controller); the migration's reconcile is the one
/// writer of its status.
#[derive(Clone, Debug, Default)]
pub struct FollowedMigration {
    /// The phase the source agent reported last.
    pub phase: Option<hvx_api::migration::MigrationPhase>,
    /// Memory and disk bytes sent so far.
    pub memory_bytes: u64,
    /// Disk bytes mirrored so far.
    pub disk_bytes: u64,
    /// Downtime and total time, once ended.
    pub downtime_ms: u64,
    /// Total time, once ended.
    pub total_ms: u64,
    /// Whether it ended in post-copy.
    pub post_copy: bool,
    /// Why it failed, when it did.
    pub failure: Option<String>,
    /// The stream reached a final phase (the task is done).
    pub ended: bool,
    /// The status the reconcile last wrote while following (the cached object can lag
    /// behind it).
    pub written: Option<hvx_api::migration::VmMigrationStatus>,
    /// When it wrote it (progress alone is written at most once a second).
    pub written_at: Option<Instant>,
}
