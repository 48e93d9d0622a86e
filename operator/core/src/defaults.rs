//! Defaults of the operator's settings, used by `Default` and by the binary's flags
//! alike (one place, so they cannot drift).

/// Launcher image.
pub const LAUNCHER_IMAGE: &str = "hvx/launcher:dev";
/// Launcher image pull policy.
pub const IMAGE_PULL_POLICY: &str = "IfNotPresent";
/// CPU request per vCPU, millicores.
pub const CPU_MILLIS_PER_VCPU: u32 = 1000;
/// Live migrations leaving one node at once.
pub const MIGRATIONS_PER_NODE: usize = 1;
/// Live migrations in the cluster at once.
pub const MIGRATIONS_TOTAL: usize = 2;
/// Objects of one kind reconciled at once.
pub const RECONCILE_CONCURRENCY: u16 = 64;
/// Deadline of one agent call (and of a stream's first answer), seconds.
pub const AGENT_TIMEOUT_SECONDS: u64 = 60;
/// A failed disk import is tried again after this long, seconds (`Timings`).
pub const IMPORT_RETRY_SECONDS: u64 = 30;
/// A migration target pod not running after this long fails the migration, seconds.
pub const MIGRATION_SCHEDULING_TIMEOUT_SECONDS: u64 = 600;
/// A failed cold disk move is tried again after this long, seconds.
pub const DISK_MOVE_RETRY_SECONDS: u64 = 20;
/// A cold disk move whose source sends nothing for this long fails, seconds.
pub const DISK_MOVE_IDLE_SECONDS: u64 = 120;
/// How often the leader looks for networks left on nodes, seconds.
pub const ORPHAN_SWEEP_SECONDS: u64 = 60;
/// A node agent's Lease is valid this long without renewal, seconds (`liveness`).
pub const NODE_LEASE_SECONDS: u64 = 20;
/// Past an expired Lease, with the Node not Ready as long, a node is Lost, seconds.
pub const NODE_LOST_GRACE_SECONDS: u64 = 20;
/// How often the leader looks at cleanup owed to lost nodes, seconds.
pub const OWED_REPLAY_SECONDS: u64 = 5;
/// The operator's namespace when `POD_NAMESPACE` is not set.
pub const NAMESPACE: &str = "hvx-system";
