//! The lifetime of every process hvx starts (issue 27: no orphans).
//!
//! One rule, two cases:
//! - **Dies with its starter** (QEMU probes, qemu-img, the launcher's QEMU, `ip`/`nft`
//!   helpers): [`spawn`] / [`spawn_tokio`] start it from one long-lived thread with
//!   `PR_SET_PDEATHSIG(SIGKILL)` and in its own process group. The kernel then kills it
//!   whenever the starter process dies, SIGKILL included. Long-running ones are also
//!   recorded on disk ([`Tracker::track`]: pid, start time, owner) so the next start
//!   of the owner reaps any that escaped ([`Tracker::reap_stale`]); the record goes
//!   when the guard drops.
//! - **Meant to survive** (dnsmasq, which daemonizes): recorded by its owner with the
//!   same [`ProcId`] (pid + start time) and adopted or replaced by the next start.
//!
//! Why one spawner thread: the parent-death signal fires when the *thread* that forked
//! the child exits, and tokio's blocking threads exit after 10 s idle; a child started
//! from one would be killed while its starter is alive. The spawner thread never ends.
#![deny(unsafe_code)]

mod error;
mod logcap;
mod procfs;
mod record;
mod spawn;

pub use error::ChildError;
pub use logcap::{cap_log, rotated_log};
pub use procfs::{ProcId, group_members, kill_and_wait, kill_orphaned_group, pgid};
pub use record::{Owner, ProcRecord, Reaped, Tracked, Tracker};
pub use spawn::{die_with_parent, keep_fds, output, output_tokio, spawn, spawn_tokio};
