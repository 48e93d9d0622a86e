//! Live migration on the local cluster (hvx installed by Helm, see the Makefile's
//! `e2e`): the examples/ two-VM application runs with a TCP stream and a ping from db
//! to web, and web writing to its disk; `kubectl drain` of web's node migrates web and
//! exits 0; the TCP stream carries on with every byte in order, web did not reboot,
//! and its disk has what it wrote before and during the migration. Then a migration of
//! db whose target pod is killed half-way fails and leaves db running where it was;
//! spec changes apply live or by a restart; and a user migration allowing post-copy
//! moves web while it rewrites memory faster than the link, ending in post-copy with
//! the same boot and memory. Last, db with evictionStrategy Shutdown: a drain shuts it
//! down and it restarts on another node with its disk (moved there) intact.

mod common;

use common::guest::*;
use common::*;
use hvx_api::VmApplication;
use hvx_api::migration::{MigrationPhase, VmMigration, VmMigrationStatus};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const NS: &str = "hvx-e2e-migrate";

fn kubectl() -> PathBuf {
    if let Ok(k) = std::env::var("KUBECTL") {
        return k.into();
    }
    let versions =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("harness/versions.env"))
            .expect("harness/versions.env");
    let version = versions
        .lines()
        .find_map(|l| l.strip_prefix("K8S_VERSION="))
        .expect("K8S_VERSION")
        .trim()
        .to_string();
    let cache = std::env::var("HVX_CACHE").unwrap_or_else(|_| "/var/cache/hvx".into());
    PathBuf::from(cache)
        .join("k8s")
        .join(version)
        .join("bin/kubectl")
}

fn kubectl_run(args: &[&str]) -> (bool, String) {
    let out = Command::new(kubectl())
        .args(args)
        .output()
        .expect("run kubectl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn vm_node(apps: &Api<VmApplication>, vm: &str) -> Option<(String, String)> {
    let s = serde_json::to_value(apps.get("shop").await.ok()?.status).ok()?;
    let v = s["vms"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == vm)?
        .clone();
    Some((
        v["phase"].as_str()?.to_string(),
        v["node"].as_str()?.to_string(),
    ))
}

/// Waits for `vm` to be Running on a node other than `old`; its (phase, node).
async fn running_elsewhere(
    client: &kube::Client,
    apps: &Api<VmApplication>,
    vm: &str,
    old: &str,
    timeout: Duration,
) -> (String, String) {
    wait_or_dump(
        client,
        NS,
        &format!("{vm} Running on a node other than {old}"),
        timeout,
        || {
            let (apps, vm, old) = (apps.clone(), vm.to_string(), old.to_string());
            async move {
                vm_node(&apps, &vm)
                    .await
                    .filter(|(p, n)| p == "Running" && *n != old)
            }
        },
    )
    .await
}

/// Lines of a guest file, through the console (the file's content between markers).
async fn guest_file(dir: &Path, path: &str) -> Vec<String> {
    let (ok, out) = guest_run(
        dir,
        &format!("echo FILE-BEGIN; cat {path}; echo FILE-END"),
        Duration::from_secs(60),
    )
    .await;
    assert!(ok, "reading {path}:\n{out}");
    // The console echoes the typed line too: take the last framed block.
    let body = out
        .rsplit_once("FILE-BEGIN\r\n")
        .or_else(|| out.rsplit_once("FILE-BEGIN\n"))
        .map(|(_, b)| b)
        .unwrap_or_default();
    body.split("FILE-END")
        .next()
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Numbers 0..n, one per line, nothing missing, nothing repeated (the last line may
/// still be arriving).
fn assert_sequence(lines: &[String], prefix: &str, what: &str) -> usize {
    for (i, l) in lines.iter().enumerate() {
        let want = format!("{prefix}{i}");
        let partial_last = i + 1 == lines.len() && want.starts_with(l.as_str());
        assert!(
            *l == want || partial_last,
            "{what}: line {i} is {l:?}, not {want:?}: {lines:?}"
        );
    }
    lines.len()
}

async fn all_nodes(client: &kube::Client) -> Vec<Node> {
    Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("nodes")
        .items
}

async fn create_migration(migs: &Api<VmMigration>, name: &str, spec: serde_json::Value) {
    let mig: VmMigration = serde_json::from_value(serde_json::json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "VmMigration",
        "metadata": {"name": name}, "spec": spec
    }))
    .expect("migration");
    migs.create(&PostParams::default(), &mig)
        .await
        .unwrap_or_else(|e| panic!("creating migration {name}: {e}"));
}

/// Waits (10 minutes at most) for migration `name` to end in `want`; ending in the
/// other final phase fails the test at once.
async fn migration_ended(
    client: &kube::Client,
    migs: &Api<VmMigration>,
    name: &str,
    want: MigrationPhase,
) -> VmMigrationStatus {
    wait_or_dump(
        client,
        NS,
        &format!("migration {name} {want:?}"),
        Duration::from_secs(600),
        || {
            let migs = migs.clone();
            async move {
                let s = migs.get(name).await.ok()?.status?;
                let phase = s.phase?;
                let ended = matches!(phase, MigrationPhase::Completed | MigrationPhase::Failed);
                assert!(
                    !ended || phase == want,
                    "migration {name} ended {phase:?}: {s:?}"
                );
                (phase == want).then_some(s)
            }
        },
    )
    .await
}

#[tokio::test]
async fn drain_live_migrates_and_a_failed_migration_keeps_the_vm() {
    let client = client().await;
    let app_uid = apply_examples(&client, NS).await;
    let apps: Api<VmApplication> = Api::namespaced(client.clone(), NS);
    let vms = running_with_addresses(&client, NS).await;
    let find = |n: &str| vms.iter().find(|v| v.0 == n).cloned().expect("vm");
    let (db, web) = (find("db"), find("web"));
    let web_dir = vm_run_dir(&web.1, &app_uid, "web");
    let db_dir = vm_run_dir(&db.1, &app_uid, "db");
    let boot_before = guest_boot_id(&web_dir).expect("web boot id");

    // Traffic through the migration: db streams numbered lines to web's TCP echo
    // service (port 7) and records what comes back; db pings web; web writes to disk.
    let (ok, out) = guest_run(
        &db_dir,
        &format!(
            "rm -f /tmp/stop; (i=0; while [ ! -e /tmp/stop ]; do echo n$i; i=$((i+1)); sleep 0.2; done) | nc {} 7 > /tmp/echo.out 2>/dev/null & ping -i 0.5 {} > /tmp/ping.out 2>&1 & sleep 0",
            web.2, web.2
        ),
        Duration::from_secs(60),
    )
    .await;
    assert!(ok, "starting the stream on db:\n{out}");
    let (ok, out) = guest_run(
        &web_dir,
        "echo written-before > /data/before; sync; rm -f /tmp/stop; (i=0; while [ ! -e /tmp/stop ]; do echo d$i >> /data/during; sync; i=$((i+1)); sleep 0.5; done) >/dev/null 2>&1 & sleep 0",
        Duration::from_secs(60),
    )
    .await;
    assert!(ok, "starting the disk writer on web:\n{out}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !guest_file(&db_dir, "/tmp/echo.out").await.is_empty(),
        "no echo before the migration"
    );

    // Drain web's node: returns once web has moved.
    let drained = web.1.clone();
    eprintln!("draining {drained} (web)");
    let (ok, out) = tokio::task::spawn_blocking(move || {
        kubectl_run(&[
            "drain",
            &drained,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--timeout=900s",
        ])
    })
    .await
    .expect("drain task");
    if !ok {
        dump(&client, NS).await;
    }
    let _ = kubectl_run(&["uncordon", &web.1]);
    assert!(ok, "kubectl drain failed:\n{out}");
    let migs: Api<VmMigration> = Api::namespaced(client.clone(), NS);
    let done: Vec<VmMigration> = migs
        .list(&ListParams::default())
        .await
        .expect("migrations")
        .items;
    let web_mig = done
        .iter()
        .find(|m| m.spec.vm == "web")
        .unwrap_or_else(|| panic!("no VmMigration for web: {done:?}"));
    let st = web_mig.status.clone().unwrap_or_default();
    eprintln!(
        "web migrated {:?} -> {:?}: total {:?} ms, downtime {:?} ms, memory {:?} B, disk {:?} B",
        st.source_node, st.target_node, st.total_ms, st.downtime_ms, st.memory_bytes, st.disk_bytes
    );
    assert_eq!(
        st.phase,
        Some(hvx_api::migration::MigrationPhase::Completed),
        "{st:?}"
    );
    let (phase, node) =
        running_elsewhere(&client, &apps, "web", &web.1, Duration::from_secs(120)).await;
    eprintln!("web is {phase} on {node}");
    assert_eq!(st.target_node.as_deref(), Some(node.as_str()));
    let new_dir = vm_run_dir(&node, &app_uid, "web");

    // Same boot; the stream kept going, in order, without a gap; the disk has it all.
    let (ok, out) = guest_run(
        &new_dir,
        "cat /proc/sys/kernel/random/boot_id",
        Duration::from_secs(60),
    )
    .await;
    assert!(
        ok && out.contains(&boot_before),
        "web rebooted (boot id was {boot_before}):\n{out}"
    );
    let before = assert_sequence(
        &guest_file(&db_dir, "/tmp/echo.out").await,
        "n",
        "echo stream",
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lines = guest_file(&db_dir, "/tmp/echo.out").await;
    let after = assert_sequence(&lines, "n", "echo stream");
    assert!(
        after > before,
        "the TCP stream stopped at the migration ({before} lines, then {after})"
    );
    let (ok, out) = guest_run(
        &new_dir,
        "touch /tmp/stop; sleep 1; sync; echo 3 > /proc/sys/vm/drop_caches",
        Duration::from_secs(60),
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(
        guest_file(&new_dir, "/data/before").await,
        ["written-before"]
    );
    let during = assert_sequence(
        &guest_file(&new_dir, "/data/during").await,
        "d",
        "disk writes",
    );
    assert!(during > 5, "too few disk writes: {during}");
    let (ok, out) = guest_run(
        &db_dir,
        "touch /tmp/stop; killall -INT ping; sleep 1; tail -n 3 /tmp/ping.out",
        Duration::from_secs(60),
    )
    .await;
    eprintln!(
        "ping during the drain: {}",
        out.lines()
            .rev()
            .find(|l| l.contains("packet loss"))
            .unwrap_or("?")
    );
    assert!(ok, "{out}");
    // The source node is empty of VMs.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let left: Vec<String> = pods
        .list(&ListParams::default())
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(web.1.as_str()))
        .filter_map(|p| p.metadata.name)
        .collect();
    assert!(left.is_empty(), "pods left on the drained node: {left:?}");

    // A migration of db whose target pod is killed during the copy: db stays put.
    let db_boot = guest_boot_id(&db_dir).expect("db boot id");
    create_migration(
        &migs,
        "db-doomed",
        serde_json::json!({"application": "shop", "vm": "db", "bandwidthMibPerSecond": 2}),
    )
    .await;
    let target = wait_or_dump(
        &client,
        NS,
        "db's migration copying",
        Duration::from_secs(600),
        || {
            let (migs, pods) = (migs.clone(), pods.clone());
            async move {
                let m = migs.get("db-doomed").await.ok()?;
                let phase = m.status.as_ref()?.phase?;
                use hvx_api::migration::MigrationPhase as P;
                assert!(
                    !matches!(phase, P::Failed | P::Completed),
                    "migration ended before the kill: {:?}",
                    m.status
                );
                if !matches!(phase, P::PreCopy | P::MirroringDisks) {
                    return None;
                }
                pods.list(&ListParams::default().labels("hvx.dev/migration-target=db-doomed"))
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .next()?
                    .metadata
                    .name
            }
        },
    )
    .await;
    eprintln!("killing target pod {target} mid-migration");
    pods.delete(
        &target,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .expect("delete target pod");
    let failed = migration_ended(&client, &migs, "db-doomed", MigrationPhase::Failed).await;
    eprintln!("failed as it should: {:?}", failed.failure_reason);
    // The application's status catches up with the failed migration in its next pass;
    // db must be Running where it was (never anywhere else).
    let (phase, node) = wait_or_dump(
        &client,
        NS,
        "db Running on its node after the failed migration",
        Duration::from_secs(120),
        || {
            let (apps, home) = (apps.clone(), db.1.clone());
            async move {
                let (phase, node) = vm_node(&apps, "db").await?;
                assert_eq!(node, home, "db left its node after a failed migration");
                (phase == "Running").then_some((phase, node))
            }
        },
    )
    .await;
    assert_eq!((phase.as_str(), node.as_str()), ("Running", db.1.as_str()));
    assert_eq!(
        guest_boot_id(&db_dir).as_deref(),
        Some(db_boot.as_str()),
        "db rebooted"
    );
    let (ok, out) = guest_run(&db_dir, "echo still-here", Duration::from_secs(60)).await;
    assert!(ok && out.contains("still-here"), "{out}");

    // Spec changes of running VMs: db's shutdown grace applies live (same boot); web's
    // memory needs a new QEMU (graceful restart, new boot). Status says which.
    let mut app = apps.get("shop").await.expect("app");
    // (The migrated guest's boot line is on the source's serial log: it is boot_before.)
    let web_boot = boot_before.clone();
    for vm in &mut app.spec.vms {
        match vm.name.as_str() {
            "db" => vm.shutdown_grace_seconds += 7,
            "web" => vm.memory_mib += 64,
            _ => {}
        }
    }
    app.metadata.managed_fields = None;
    apps.replace("shop", &PostParams::default(), &app)
        .await
        .expect("update spec");
    let changes = wait_or_dump(
        &client,
        NS,
        "spec changes applied",
        Duration::from_secs(600),
        || {
            let apps = apps.clone();
            async move {
                let s = serde_json::to_value(apps.get("shop").await.ok()?.status).ok()?;
                let of = |n: &str| -> Option<(String, String)> {
                    let v = s["vms"].as_array()?.iter().find(|v| v["name"] == n)?;
                    Some((
                        v["phase"].as_str()?.into(),
                        v["pendingChange"].as_str()?.into(),
                    ))
                };
                let (db, web) = (of("db")?, of("web")?);
                (db.1.starts_with("applied live: shutdownGraceSeconds")
                    && web.0 == "Running"
                    && web.1.starts_with("applied by a restart: memoryMib"))
                .then_some((db.1, web.1))
            }
        },
    )
    .await;
    eprintln!("spec changes: db {:?}, web {:?}", changes.0, changes.1);
    assert_eq!(
        guest_boot_id(&db_dir).as_deref(),
        Some(db_boot.as_str()),
        "db restarted for a live change"
    );
    let web_now = vm_node(&apps, "web").await.expect("web").1;
    let web_dir_now = vm_run_dir(&web_now, &app_uid, "web");
    let rebooted = wait_for(
        "web's new boot on its serial log",
        Duration::from_secs(300),
        || {
            let d = web_dir_now.clone();
            let old = web_boot.clone();
            async move { guest_boot_id(&d).filter(|b| *b != old) }
        },
    )
    .await;
    eprintln!("web rebooted with more memory: boot {rebooted}");

    // Post-copy: web rewrites 32 MiB of memory over and over, faster than an 8 MiB/s
    // cap lets pre-copy send it; a user migration allowing post-copy (every node here
    // is labelled hvx.dev/post-copy=true) ends in it, with the guest's memory intact.
    for n in all_nodes(&client).await {
        let label = n
            .metadata
            .labels
            .unwrap_or_default()
            .get("hvx.dev/post-copy")
            .cloned();
        assert_eq!(
            label.as_deref(),
            Some("true"),
            "post-copy label of {:?}",
            n.metadata.name
        );
    }
    const MEMORY_AND_BOOT: &str = "md5sum /mem/keep; cat /proc/sys/kernel/random/boot_id";
    for cmd in [
        "mkdir -p /mem && mount -t tmpfs -o size=80m tmpfs /mem && head -c 33554432 /dev/urandom >/mem/keep",
        "(while :; do cp /mem/keep /mem/churn; done) >/dev/null 2>&1 & sleep 1",
    ] {
        let (ok, out) = guest_run(&web_dir_now, cmd, Duration::from_secs(120)).await;
        assert!(ok, "{cmd}:\n{out}");
    }
    let (ok, before) = guest_run(&web_dir_now, MEMORY_AND_BOOT, Duration::from_secs(60)).await;
    assert!(ok, "{before}");
    let facts = |s: &str| -> Vec<String> {
        s.lines()
            .map(str::trim)
            .filter(|l| {
                l.ends_with("  /mem/keep") || (l.len() == 36 && l.matches('-').count() == 4)
            })
            .map(str::to_string)
            .collect()
    };
    let facts_before = facts(&before);
    assert_eq!(facts_before.len(), 2, "{before}");
    create_migration(
        &migs,
        "web-post-copy",
        serde_json::json!({"application": "shop", "vm": "web", "allowPostCopy": true,
                           "bandwidthMibPerSecond": 8, "maxDowntimeMs": 50}),
    )
    .await;
    let done = migration_ended(&client, &migs, "web-post-copy", MigrationPhase::Completed).await;
    eprintln!(
        "web post-copy migration {:?} -> {:?}: total {:?} ms, downtime {:?} ms, post-copy {:?}",
        done.source_node, done.target_node, done.total_ms, done.downtime_ms, done.post_copy
    );
    assert_eq!(done.post_copy, Some(true), "{done:?}");
    let web_pc = running_elsewhere(&client, &apps, "web", &web_now, Duration::from_secs(120)).await;
    let (ok, after) = guest_run(
        &vm_run_dir(&web_pc.1, &app_uid, "web"),
        MEMORY_AND_BOOT,
        Duration::from_secs(60),
    )
    .await;
    assert!(ok, "{after}");
    assert_eq!(
        facts(&after),
        facts_before,
        "memory or boot changed:\n{before}\n{after}"
    );
    assert!(
        facts_before.contains(&rebooted),
        "{facts_before:?} vs boot {rebooted}"
    );

    // evictionStrategy Shutdown: a drain shuts db down cleanly, and db starts again on
    // another node with its disk moved there, what it wrote included (a new boot).
    shutdown_drain_restarts_elsewhere_with_its_disk(&client, &apps, &app_uid, &db.1).await;

    // Clean up everything; nothing stays on any node (the vms test checks the same).
    delete_all_hvx_objects(&client, NS).await;
    for n in all_nodes(&client).await {
        let name = n.metadata.name.unwrap_or_default();
        let paths =
            hvx_api::node::NodePaths::new(Path::new(STORE_ROOT), Path::new(RUN_ROOT), &name);
        let leftover: Vec<String> = std::fs::read_dir(paths.disk_store().join("disks"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.path().display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        assert!(leftover.is_empty(), "overlays left on {name}: {leftover:?}");
    }
    delete_namespace(&client, NS).await;
}

/// Uncordons a node when dropped (a failed assertion must not leave it cordoned).
struct Uncordon(String);

impl Drop for Uncordon {
    fn drop(&mut self) {
        let _ = kubectl_run(&["uncordon", &self.0]);
    }
}

async fn shutdown_drain_restarts_elsewhere_with_its_disk(
    client: &kube::Client,
    apps: &Api<VmApplication>,
    app_uid: &str,
    db_node: &str,
) {
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let mut app = apps.get("shop").await.expect("app");
    for vm in &mut app.spec.vms {
        if vm.name == "db" {
            vm.eviction_strategy = hvx_api::EvictionStrategy::Shutdown;
        }
    }
    app.metadata.managed_fields = None;
    apps.replace("shop", &PostParams::default(), &app)
        .await
        .expect("evictionStrategy Shutdown for db");
    // Applied live: db's PodDisruptionBudget goes, so the drain may evict db's pod.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NS);
    let pdb = hvx_operator::build::pod_name("shop", "db");
    wait_or_dump(
        client,
        NS,
        "db's PodDisruptionBudget removed",
        Duration::from_secs(120),
        || {
            let (pdbs, pdb) = (pdbs.clone(), pdb.clone());
            async move { pdbs.get_opt(&pdb).await.ok()?.is_none().then_some(()) }
        },
    )
    .await;
    let db_dir = vm_run_dir(db_node, app_uid, "db");
    let boot = guest_boot_id(&db_dir).expect("db boot id");
    let (ok, out) = guest_run(
        &db_dir,
        "echo kept-across-the-move > /data/moved; sync",
        Duration::from_secs(60),
    )
    .await;
    assert!(ok, "writing on db:\n{out}");

    eprintln!("draining {db_node} (db, evictionStrategy Shutdown)");
    let _uncordon = Uncordon(db_node.to_string());
    let node = db_node.to_string();
    let started = std::time::Instant::now();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        kubectl_run(&[
            "drain",
            &node,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--timeout=600s",
        ])
    })
    .await
    .expect("drain task");
    if !ok {
        dump(client, NS).await;
    }
    assert!(ok, "kubectl drain failed:\n{out}");
    eprintln!("drain returned in {:?}", started.elapsed());
    // Running elsewhere (the node stays cordoned until then, or db would just come back).
    let (_, new_node) =
        running_elsewhere(client, apps, "db", db_node, Duration::from_secs(600)).await;
    eprintln!(
        "db restarted on {new_node} {:?} after the drain began",
        started.elapsed()
    );
    let new_dir = vm_run_dir(&new_node, app_uid, "db");
    let new_boot = wait_for(
        "db's boot on its new node",
        Duration::from_secs(120),
        || {
            let d = new_dir.clone();
            async move { guest_boot_id(&d) }
        },
    )
    .await;
    assert_ne!(new_boot, boot, "db was restarted, so it has a new boot");
    assert_eq!(
        guest_file(&new_dir, "/data/moved").await,
        ["kept-across-the-move"],
        "db's disk did not move with it"
    );
    // The move is visible as events, and the old node's copy goes once db runs.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), NS);
    let moved = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("VmDisksMoved"))
        .filter_map(|e| e.message)
        .collect::<Vec<_>>();
    assert!(
        moved
            .iter()
            .any(|m| m.contains("VM db") && m.contains(&new_node)),
        "no VmDisksMoved event for db: {moved:?}"
    );
    let (key, _) = hvx_api::node::vm_overlay_ref(&format!("{app_uid}/db"), "root");
    let old_copy =
        hvx_api::node::NodePaths::new(Path::new(STORE_ROOT), Path::new(RUN_ROOT), db_node)
            .disk_store()
            .join("disks")
            .join(key);
    wait_for(
        "the old copy of db's disk deleted",
        Duration::from_secs(120),
        || {
            let p = old_copy.clone();
            async move { (!p.exists()).then_some(()) }
        },
    )
    .await;
}
