//! Waiting for the node: the operator asks this node's agent to import the disks,
//! create the VM's overlays and plug its taps into the overlay switch once the pod is
//! bound here; the launcher boots only when all of that is in place, and says what it
//! still waits for (status.json, logs) meanwhile.

use super::LauncherError;
use super::map::StoreResolver;
use hvx_api::launch::LaunchSpec;
use std::path::Path;
use std::time::{Duration, Instant};

/// What is not ready yet on this node for `ls` (empty = ready to boot).
pub fn missing(ls: &LaunchSpec, store: &StoreResolver, sys_net: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for d in &ls.disks {
        if !store.meta_path(&d.name).is_file() {
            out.push(format!("overlay of disk {}", d.name));
        }
    }
    for n in &ls.nics {
        // A tap is usable once the switch enslaved it to the network's bridge.
        if !sys_net.join(&n.tap).join("master").exists() {
            out.push(format!(
                "tap {} of NIC {} on the overlay switch",
                n.tap, n.name
            ));
        }
    }
    out
}

/// Polls until nothing is missing; `report` is called whenever the missing set
/// changes (status file, log). Gives up after `timeout` with what was still missing.
pub async fn wait_ready(
    ls: &LaunchSpec,
    store: &StoreResolver,
    sys_net: &Path,
    timeout: Duration,
    mut report: impl FnMut(&[String]),
) -> Result<(), LauncherError> {
    let deadline = Instant::now() + timeout;
    let mut last: Option<Vec<String>> = None;
    loop {
        let now_missing = missing(ls, store, sys_net);
        if now_missing.is_empty() {
            return Ok(());
        }
        if last.as_ref() != Some(&now_missing) {
            report(&now_missing);
            last = Some(now_missing.clone());
        }
        if Instant::now() >= deadline {
            return Err(LauncherError::Map(format!(
                "node agent did not prepare this node within {}s; still missing: {}",
                timeout.as_secs(),
                now_missing.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> LaunchSpec {
        super::super::map::fixture()
    }

    #[tokio::test]
    async fn waits_for_overlay_and_enslaved_tap_then_resolves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StoreResolver {
            store_root: dir.path().join("store"),
            vm_id: "uid-1/web".into(),
        };
        let sys_net = dir.path().join("sys-class-net");
        let ls = launch();
        let m = missing(&ls, &store, &sys_net);
        assert_eq!(m.len(), 2, "{m:?}");
        let err = wait_ready(&ls, &store, &sys_net, Duration::from_millis(300), |_| {})
            .await
            .expect_err("times out");
        assert!(err.to_string().contains("overlay of disk boot"), "{err}");

        // The agent's side: overlay metadata, then the tap enslaved to a bridge.
        let meta = store.meta_path("boot");
        std::fs::create_dir_all(meta.parent().expect("parent")).expect("mkdir");
        let disk = hvx_storage::chain::DiskMeta::new("vm-x", "boot", "abc", 1 << 20);
        std::fs::write(&meta, serde_json::to_vec(&disk).expect("json")).expect("write");
        std::fs::create_dir_all(sys_net.join("hvt0123456789ab").join("master")).expect("tap");
        let mut reports = 0;
        wait_ready(&ls, &store, &sys_net, Duration::from_secs(5), |_| {
            reports += 1
        })
        .await
        .expect("ready");
        assert_eq!(reports, 0, "nothing missing, nothing reported");
        let (path, _) =
            super::super::map::DiskResolver::resolve(&store, "d-uid", "boot").expect("resolves");
        assert_eq!(path, meta.with_file_name(format!("{}.qcow2", disk.active)));
    }
}
