//! What the operator hands a VM's launcher pod: the VM as declared plus everything the
//! operator resolved (VNIs, disk UIDs, tap names). The node agent completes it with
//! node-local paths before the launcher boots the VM.

use crate::vmapp::VirtualMachine;
use serde::{Deserialize, Serialize};

/// File name of the launch spec inside the launcher's config volume.
pub const LAUNCH_SPEC_FILE: &str = "launch.json";

/// The launcher's input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LaunchSpec {
    /// Namespace of the application.
    pub namespace: String,
    /// VmApplication name.
    pub application: String,
    /// Stable identity of this VM across pods and migrations: `<app uid>/<vm name>`.
    pub vm_id: String,
    /// The VM as the user declared it.
    pub vm: VirtualMachine,
    /// Disks with their OverlayDisk resolved.
    pub disks: Vec<LaunchDisk>,
    /// NICs with their network resolved.
    pub nics: Vec<LaunchNic>,
    /// Set on the target pod of a live migration: QEMU starts paused and receives the
    /// running VM instead of booting it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<IncomingMigration>,
}

/// Where a migration target listens (chosen by the target node's agent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IncomingMigration {
    /// VmMigration name.
    pub migration: String,
    /// Target node address.
    pub host: String,
    /// Memory stream port.
    pub migration_port: u16,
    /// NBD port for the disk mirrors.
    pub nbd_port: u16,
    /// The source may switch to post-copy: set only when both nodes' agents found
    /// that their QEMU takes it (node label `hvx.dev/post-copy=true`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub post_copy: bool,
}

/// A disk with its OverlayDisk resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LaunchDisk {
    /// VM disk name.
    pub name: String,
    /// OverlayDisk UID (the agent's key for the base).
    pub disk_uid: String,
    /// Content digest of the base, once imported somewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// A NIC with its network resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LaunchNic {
    /// VM NIC name.
    pub name: String,
    /// VirtualNetwork UID.
    pub network_uid: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Host tap device the NIC is backed by.
    pub tap: String,
}

/// A launcher's phase, as it writes it in its run dir's `status.json` and the node
/// agent reads it: one type for both, so neither matches the other's text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LauncherPhase {
    /// The node lacks something the VM needs (disks, taps): see `waitingFor`.
    #[default]
    WaitingForNode,
    /// QEMU is starting.
    Starting,
    /// A live migration's target: QEMU waits for the incoming state.
    Incoming,
    /// QEMU runs the guest.
    Running,
    /// QEMU exited and is being started again (crash policy).
    Restarting,
    /// The guest powered off.
    Stopped,
    /// QEMU cannot run the VM (see `lastExit`).
    Failed,
    /// A phase this build does not know (a newer launcher).
    #[serde(other)]
    Unknown,
}

/// Deterministic host tap name for a VM NIC: `hvt` + 12 hex digits (15 chars, the
/// kernel's limit). Agent, launcher and operator compute the same name independently.
pub fn tap_name(vm_id: &str, nic: &str) -> String {
    format!(
        "hvt{:012x}",
        fnv1a(&format!("{vm_id}/{nic}")) & 0xffff_ffff_ffff
    )
}

/// A VM's launcher pod name: `<app>-<vm>`, shortened with a hash when over 63
/// characters. The operator names pods so and trusts no other name.
pub fn pod_name(app: &str, vm: &str) -> String {
    let name = format!("{app}-{vm}");
    if name.len() <= 63 {
        return name;
    }
    let hash = format!("{:08x}", fnv1a(&name) as u32);
    format!("{}-{hash}", &name[..54].trim_end_matches('-'))
}

/// A live migration's target pod name: the VM's pod name and 6 alphanumerics of the
/// migration's uid.
pub fn target_pod_name(app: &str, vm: &str, migration_uid: &str) -> String {
    let base = pod_name(app, vm);
    let suffix: String = migration_uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(6)
        .collect();
    let keep = 63 - suffix.len() - 1;
    let base: String = base.chars().take(keep).collect();
    format!("{}-{suffix}", base.trim_end_matches('-'))
}

/// FNV-1a, 64 bit: tiny, stable across Rust versions (unlike `DefaultHasher`).
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_stable_short_and_distinct() {
        let a = tap_name("uid-1/web", "ethernet0");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("hvt"));
        assert_eq!(a, tap_name("uid-1/web", "ethernet0"));
        assert_ne!(a, tap_name("uid-1/web", "ethernet1"));
        assert_ne!(a, tap_name("uid-2/web", "ethernet0"));
        // Pinned: a change would orphan taps of running VMs across an upgrade.
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }
}

#[cfg(test)]
mod launcher_phase_tests {
    use super::LauncherPhase;

    #[test]
    fn launcher_phase_reads_what_launchers_write_and_tolerates_new_ones() {
        for (text, phase) in [
            ("\"WaitingForNode\"", LauncherPhase::WaitingForNode),
            ("\"Incoming\"", LauncherPhase::Incoming),
            ("\"Running\"", LauncherPhase::Running),
            ("\"Failed\"", LauncherPhase::Failed),
        ] {
            assert_eq!(
                serde_json::from_str::<LauncherPhase>(text).ok(),
                Some(phase)
            );
            assert_eq!(serde_json::to_string(&phase).ok().as_deref(), Some(text));
        }
        assert_eq!(
            serde_json::from_str::<LauncherPhase>("\"Hibernating\"").ok(),
            Some(LauncherPhase::Unknown)
        );
    }
}
