//! Waiting for the node: the operator asks this node's agent to import the disks,
//! create the VM's overlays and plug its taps into the overlay switch once the pod is
//! bound here; the launcher boots only when all of that is in place, and says what it
//! still waits for (status.json, logs) meanwhile.

use super::LauncherError;
use super::map::StoreResolver;
use hvx_api::launch::LaunchSpec;
use std::time::{Duration, Instant};

/// Overlays of `ls` not in place on this node yet.
pub fn missing_overlays(ls: &LaunchSpec, store: &StoreResolver) -> Vec<String> {
    ls.disks
        .iter()
        .filter(|d| !store.meta_path(&d.name).is_file())
        .map(|d| format!("overlay of disk {}", d.name))
        .collect()
}

/// Polls until nothing is missing: overlays (files in the store) and taps, which
/// `taps_waiting` asks the node agent about (the launcher has no view of the node's
/// network: `TapClient::waiting`; Err: the agent refuses this launcher). `report` is
/// called whenever the missing set changes (status file, log). Gives up after
/// `timeout` with what was still missing.
pub async fn wait_ready<F, Fut>(
    ls: &LaunchSpec,
    store: &StoreResolver,
    mut taps_waiting: F,
    timeout: Duration,
    mut report: impl FnMut(&[String]),
) -> Result<(), LauncherError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<String>, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut last: Option<Vec<String>> = None;
    loop {
        let mut now_missing = missing_overlays(ls, store);
        if !ls.nics.is_empty() {
            now_missing.extend(taps_waiting().await.map_err(|e| {
                LauncherError::Map(format!("the node agent refuses this VM its taps: {e}"))
            })?);
        }
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
        let enslaved = dir.path().join("enslaved");
        let taps = || {
            let ready = enslaved.exists();
            async move {
                Ok(if ready {
                    Vec::new()
                } else {
                    vec!["tap hvt0123456789ab of NIC ethernet0".to_string()]
                })
            }
        };
        let ls = launch();
        assert_eq!(missing_overlays(&ls, &store).len(), 1);
        let err = wait_ready(&ls, &store, taps, Duration::from_millis(300), |_| {})
            .await
            .expect_err("times out");
        assert!(err.to_string().contains("overlay of disk boot"), "{err}");
        assert!(err.to_string().contains("tap hvt0123456789ab"), "{err}");

        // The agent's side: overlay metadata, then the tap enslaved to a bridge.
        let meta = store.meta_path("boot");
        std::fs::create_dir_all(meta.parent().expect("parent")).expect("mkdir");
        let disk = hvx_storage::chain::DiskMeta::new("vm-x", "boot", "abc", 1 << 20);
        std::fs::write(&meta, serde_json::to_vec(&disk).expect("json")).expect("write");
        std::fs::write(&enslaved, b"").expect("tap");
        let mut reports = 0;
        wait_ready(&ls, &store, taps, Duration::from_secs(5), |_| reports += 1)
            .await
            .expect("ready");
        assert_eq!(reports, 0, "nothing missing, nothing reported");
        let (path, _) =
            super::super::map::DiskResolver::resolve(&store, "d-uid", "boot").expect("resolves");
        assert_eq!(path, meta.with_file_name(format!("{}.qcow2", disk.active)));

        // A refusal ends the wait at once.
        let refused = wait_ready(
            &ls,
            &store,
            || async { Err("not this pod".to_string()) },
            Duration::from_secs(5),
            |_| {},
        )
        .await
        .expect_err("refused");
        assert!(refused.to_string().contains("not this pod"), "{refused}");
    }
}
