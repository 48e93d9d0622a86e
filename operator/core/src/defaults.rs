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
