//! Post-copy: the switch for guests that dirty memory faster than pre-copy can send it.
//!
//! Pre-copy with auto-converge always ends, but for a guest writing memory at link
//! speed it ends by throttling the vCPUs to a crawl for a long time. Post-copy instead
//! moves the vCPUs to the target after a few passes and pulls the missing pages on
//! demand (userfaultfd on the target), so the migration time is bounded. The price:
//! from the switch on, the guest's memory lives on both nodes until every page has
//! arrived, and losing either node then loses the VM. That is why it is opt-in
//! (`allowPostCopy`) and why drains do not use it by default.
//!
//! Both QEMUs need the `postcopy-ram` capability before the migration starts; the
//! target's QEMU only accepts it where userfaultfd works, which [`probe`] checks the
//! same way (agents label their node with the answer, and the operator allows
//! post-copy only between two nodes that have it).

use crate::qmp::QmpClient;
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// What the source does next in a pre-copy that allows post-copy.
pub fn should_switch(status: &str, passes: u64, after_passes: Option<u64>, started: bool) -> bool {
    match after_passes {
        Some(n) => !started && status == "active" && passes >= n,
        None => false,
    }
}

/// QEMU's run of a post-copy, as the source's `query-migrate` status names it.
pub fn is_postcopy_status(status: &str) -> bool {
    status.starts_with("postcopy")
}

/// Whether a QMP event says the migration entered post-copy.
pub fn is_postcopy_event(e: &crate::qmp::QmpEvent) -> bool {
    e.event == "MIGRATION"
        && e.data
            .get("status")
            .and_then(serde_json::Value::as_str)
            .is_some_and(is_postcopy_status)
}

/// Checks that a migration target on this host can take post-copy: a QEMU waiting
/// for an incoming migration must accept the `postcopy-ram` capability (it then has
/// tested userfaultfd itself). `Err` carries QEMU's reason.
pub async fn probe(qemu: &str) -> std::result::Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix("hvx-postcopy-probe-")
        .tempdir()
        .map_err(|e| format!("cannot create a probe directory: {e}"))?;
    let sock = dir.path().join("qmp.sock");
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-machine",
        "none",
        "-display",
        "none",
        "-S",
        "-incoming",
        "defer",
        "-qmp",
    ])
    .arg(format!("unix:{},server=on,wait=off", sock.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = hvx_child::spawn_tokio(cmd)
        .await
        .map_err(|e| format!("cannot run {qemu}: {e}"))?;
    let _record = hvx_child::Tracker::track_global(child.id(), "post-copy probe");
    let answer = async {
        let qmp = QmpClient::connect(&sock, Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]})),
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string())
    };
    let result = tokio::time::timeout(Duration::from_secs(20), answer)
        .await
        .unwrap_or_else(|_| Err("the probe QEMU did not answer within 20s".into()));
    let _ = child.kill().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_once_after_the_passes_and_only_in_precopy() {
        assert!(!should_switch("active", 100, None, false), "not allowed");
        assert!(!should_switch("active", 2, Some(3), false), "too early");
        assert!(should_switch("active", 3, Some(3), false));
        assert!(!should_switch("active", 9, Some(3), true), "already asked");
        assert!(!should_switch("pre-switchover", 9, Some(3), false));
        assert!(!should_switch("setup", 9, Some(3), false));
    }

    #[test]
    fn postcopy_event() {
        let ev = |name: &str, status: &str| crate::qmp::QmpEvent {
            event: name.into(),
            data: json!({"status": status}),
            timestamp: 0.0,
        };
        assert!(is_postcopy_event(&ev("MIGRATION", "postcopy-active")));
        assert!(!is_postcopy_event(&ev("MIGRATION", "active")));
        assert!(!is_postcopy_event(&ev("MIGRATION_PASS", "postcopy-active")));
    }

    #[test]
    fn postcopy_statuses() {
        for s in [
            "postcopy-active",
            "postcopy-paused",
            "postcopy-recover",
            "postcopy-recover-setup",
        ] {
            assert!(is_postcopy_status(s), "{s}");
        }
        for s in ["active", "completed", "pre-switchover", "device", "failed"] {
            assert!(!is_postcopy_status(s), "{s}");
        }
    }
}
