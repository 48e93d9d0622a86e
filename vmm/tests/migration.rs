//! Privileged: live migration between two QEMUs (TCG) on this host without shared
//! storage: the top overlay is mirrored over NBD, memory pre-copied, both over TLS-PSK.
//! First a migration whose target dies half-way (the source must keep running), then a
//! real one with a guest writing to its disk the whole time.

mod common;

use common::*;
use hvx_vmm::console::{SerialConsole, SerialLog};
use hvx_vmm::migration::{self, Progress, TargetEndpoint, Tuning};
use hvx_vmm::vm::{ExitKind, StartOptions, Vm};
use hvx_vmm::{Accel, VmSpec};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(180);
const CMD: Duration = Duration::from_secs(30);
const MIGRATE: Duration = Duration::from_secs(300);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn endpoint() -> TargetEndpoint {
    TargetEndpoint {
        host: "127.0.0.1".into(),
        migration_port: free_port(),
        nbd_port: free_port(),
    }
}

/// An empty overlay over the same base as the source's (what the target node has
/// after fetching the base by digest).
fn target_overlay(src_dir: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("target dir");
    let overlay = dir.join("boot.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(src_dir.join("base.qcow2"))
        .arg(&overlay)
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img create failed");
    overlay
}

/// The source ends in `postmigrate`. QEMU reports the migration `completed` a moment
/// before its cleanup leaves `finish-migrate` (after post-copy especially), so the
/// state is polled briefly; anything else (running, paused) fails at once.
async fn assert_source_postmigrate(source: &Vm) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let state = source.run_state().await.expect("source state");
        match state.as_str() {
            "postmigrate" => return,
            "finish-migrate" if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => panic!("source is {other:?} after the migration, not postmigrate"),
        }
    }
}

async fn start_target(spec: &VmSpec, ep: &TargetEndpoint, tls: &Path, post_copy: bool) -> Vm {
    let opts = StartOptions {
        incoming: true,
        ..StartOptions::default()
    };
    let vm = Vm::start(spec, Accel::Tcg, &opts)
        .await
        .expect("start target");
    migration::listen_incoming(vm.qmp(), ep, &["boot".to_string()], Some(tls), post_copy)
        .await
        .expect("target listens");
    vm
}

/// A source disk (an overlay over a qcow2 base) in `tmp/src` and a migration key in
/// `tmp/tls`: (source dir, source disk, key dir).
fn source_and_key(tmp: &Path, key: &[u8]) -> (PathBuf, PathBuf, PathBuf) {
    let src_dir = tmp.join("src");
    std::fs::create_dir_all(&src_dir).expect("src dir");
    let src_disk = overlay_on_qcow2_base(&guest_dir(), &src_dir);
    let tls = tmp.join("tls");
    migration::write_psk(&tls, key).expect("psk");
    (src_dir, src_disk, tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: make test-integration"]
async fn live_migration_with_disk_mirror_over_tls() {
    if !require_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src_dir, src_disk, tls) = source_and_key(tmp.path(), b"0123456789abcdef0123456789abcdef");
    // Too short a key is refused before QEMU sees it.
    assert!(migration::write_psk(&tmp.path().join("weak"), b"short").is_err());

    let src_spec = vm_spec("mig", &src_disk, &tmp.path().join("run-src"));
    let mut source = Vm::start(&src_spec, Accel::Tcg, &StartOptions::default())
        .await
        .expect("start source");
    let mut log = SerialLog::new(&source.paths().serial_log);
    log.wait_for("HVX-GUEST ready", BOOT)
        .await
        .expect("guest ready");
    let mut con = SerialConsole::connect(&source.paths().serial)
        .await
        .expect("console");
    let boot_id = con
        .run("cat /proc/sys/kernel/random/boot_id", CMD)
        .await
        .expect("boot id")
        .trim()
        .to_string();
    con.run("echo written-before > /data/before; sync", CMD)
        .await
        .expect("write before");
    // A writer that keeps appending (and syncing) through the migrations.
    con.run(
        "(i=0; while [ ! -e /tmp/stop ]; do echo line-$i >> /data/during; sync; i=$((i+1)); sleep 0.2; done) >/dev/null 2>&1 & sleep 0",
        CMD,
    )
    .await
    .expect("start writer");
    drop(con);

    // 1. The target dies during pre-copy: the source keeps running, nothing lost.
    let ep = endpoint();
    let doomed_spec = vm_spec(
        "mig",
        &target_overlay(&src_dir, &tmp.path().join("doomed")),
        &tmp.path().join("run-doomed"),
    );
    let doomed = start_target(&doomed_spec, &ep, &tls, false).await;
    let doomed_pid = doomed.pid().expect("target pid");
    let slow = Tuning {
        bandwidth_mib_per_second: 4,
        ..Tuning::default()
    };
    let mut killed = false;
    let mut kill_in_precopy = |p: &Progress| {
        if p.stage == "precopy" && !killed {
            killed = Command::new("kill")
                .args(["-9", &doomed_pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
        }
    };
    let err = migration::migrate_to(
        source.qmp(),
        &ep,
        &["boot".to_string()],
        Some(&tls),
        &slow,
        MIGRATE,
        &mut kill_in_precopy,
    )
    .await
    .expect_err("migration to a dead target must fail");
    assert!(killed, "target was never killed: {err}");
    drop(doomed);
    assert_eq!(
        source.run_state().await.expect("state"),
        "running",
        "source must keep running after {err}"
    );
    let mut con = SerialConsole::connect(&source.paths().serial)
        .await
        .expect("console");
    let out = con
        .run("cat /proc/sys/kernel/random/boot_id; cat /data/before", CMD)
        .await
        .expect("source alive");
    assert!(
        out.contains(&boot_id) && out.contains("written-before"),
        "{out:?}"
    );
    drop(con);

    // 2. A real migration, the writer still running.
    let ep = endpoint();
    let dst_dir = tmp.path().join("dst");
    let dst_spec = vm_spec(
        "mig",
        &target_overlay(&src_dir, &dst_dir),
        &tmp.path().join("run-dst"),
    );
    let target = start_target(&dst_spec, &ep, &tls, false).await;
    let mut stages = Vec::new();
    let mut record = |p: &Progress| {
        if stages.last() != Some(&p.stage) {
            stages.push(p.stage);
        }
    };
    let disks = ["boot".to_string()];
    let tuning = Tuning::default();
    let (report, resumed) = tokio::join!(
        migration::migrate_to(
            source.qmp(),
            &ep,
            &disks,
            Some(&tls),
            &tuning,
            MIGRATE,
            &mut record,
        ),
        migration::finish_incoming(target.qmp(), MIGRATE),
    );
    let report = report.expect("migration");
    let resume_ms = resumed.expect("target resumed");
    eprintln!(
        "migrated: total {} ms, downtime {} ms (+{resume_ms} ms to resume), ram {} MiB, disk {} KiB, stages {stages:?}",
        report.total_ms,
        report.downtime_ms,
        report.ram_bytes >> 20,
        report.disk_bytes >> 10
    );
    assert_eq!(stages.first(), Some(&"mirroring"), "{stages:?}");
    assert!(stages.contains(&"switchover"), "{stages:?}");
    assert!(report.ram_bytes > 1 << 20, "{report:?}");
    assert!(report.disk_bytes > 0, "{report:?}");
    assert_source_postmigrate(&source).await;
    assert_eq!(target.run_state().await.expect("target state"), "running");
    source.power_off().await.expect("stop source");
    assert_eq!(source.wait_exit().await, ExitKind::HostRequested);
    source.stop_and_cleanup().await.expect("cleanup source");

    // Same boot, and the data is read from the target's disk, not the page cache.
    let mut con = SerialConsole::connect(&target.paths().serial)
        .await
        .expect("target console");
    con.send_line("").await.expect("poke");
    let before = con
        .run("wc -l < /data/during", CMD)
        .await
        .expect("count lines");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = con
        .run(
            "touch /tmp/stop; sleep 1; sync; echo 3 > /proc/sys/vm/drop_caches; cat /proc/sys/kernel/random/boot_id; cat /data/before; wc -l < /data/during; tail -n 1 /data/during",
            CMD,
        )
        .await
        .expect("after migration");
    assert!(out.contains(&boot_id), "guest rebooted: {out:?}");
    assert!(out.contains("written-before"), "{out:?}");
    let count = |s: &str| {
        s.lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .next_back()
            .unwrap_or(0)
    };
    assert!(
        count(&out) > count(&before) && count(&before) >= 3,
        "writer did not continue on the target: before {before:?}, after {out:?}"
    );
    let last = out
        .lines()
        .rev()
        .find(|l| l.starts_with("line-"))
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        last,
        format!("line-{}", count(&out) - 1),
        "lines lost or duplicated: {out:?}"
    );
    drop(con);
    target.stop_and_cleanup().await.expect("cleanup target");
}

/// A guest rewriting memory (16 MiB copied over and over) faster than a 16 MiB/s link:
/// pre-copy (auto-converge off, 50 ms downtime limit) cannot end, so after two passes the source switches to post-copy; the guest runs on
/// the target with the same boot and the memory it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: make test-integration"]
async fn post_copy_moves_a_guest_dirtying_memory_faster_than_the_link() {
    if !require_root() {
        return;
    }
    if let Err(why) = hvx_vmm::postcopy::probe("qemu-system-x86_64").await {
        eprintln!("SKIP: this host's QEMU takes no post-copy: {why}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src_dir, src_disk, tls) = source_and_key(tmp.path(), b"fedcba9876543210fedcba9876543210");
    let source = Vm::start(
        &vm_spec("pc", &src_disk, &tmp.path().join("run-src")),
        Accel::Tcg,
        &StartOptions::default(),
    )
    .await
    .expect("start source");
    SerialLog::new(&source.paths().serial_log)
        .wait_for("HVX-GUEST ready", BOOT)
        .await
        .expect("guest ready");
    let mut con = SerialConsole::connect(&source.paths().serial)
        .await
        .expect("console");
    let before = con
        .run(
            "mkdir -p /mem && mount -t tmpfs -o size=96m tmpfs /mem; cat /proc/sys/kernel/random/boot_id; head -c 16777216 /dev/urandom > /mem/keep; md5sum /mem/keep",
            CMD,
        )
        .await
        .expect("fill memory");
    con.run(
        "(while :; do cp /mem/keep /mem/churn; done) >/dev/null 2>&1 & sleep 2",
        CMD,
    )
    .await
    .expect("start dirtying");
    drop(con);

    // The target's QEMU must take post-copy before the migration starts.
    let ep = endpoint();
    let dst_spec = vm_spec(
        "pc",
        &target_overlay(&src_dir, &tmp.path().join("dst")),
        &tmp.path().join("run-dst"),
    );
    let target = start_target(&dst_spec, &ep, &tls, true).await;
    let tuning = Tuning {
        max_downtime_ms: 50,
        bandwidth_mib_per_second: 16,
        auto_converge: false,
        post_copy_after_passes: Some(2),
    };
    let mut stages = Vec::new();
    let mut record = |p: &Progress| {
        if stages.last() != Some(&p.stage) {
            stages.push(p.stage);
        }
    };
    let disks = ["boot".to_string()];
    let (report, resumed) = tokio::join!(
        migration::migrate_to(
            source.qmp(),
            &ep,
            &disks,
            Some(&tls),
            &tuning,
            MIGRATE,
            &mut record
        ),
        migration::finish_incoming(target.qmp(), MIGRATE),
    );
    let report = report.expect("post-copy migration");
    resumed.expect("target resumed");
    eprintln!("post-copy: {report:?}, stages {stages:?}");
    assert!(report.post_copy, "{report:?} {stages:?}");
    assert!(stages.contains(&"postcopy"), "{stages:?}");
    assert_source_postmigrate(&source).await;
    assert_eq!(target.run_state().await.expect("target state"), "running");
    source.stop_and_cleanup().await.expect("cleanup source");
    let mut con = SerialConsole::connect(&target.paths().serial)
        .await
        .expect("target console");
    con.send_line("").await.expect("poke");
    let after = con
        .run("cat /proc/sys/kernel/random/boot_id; md5sum /mem/keep", CMD)
        .await
        .expect("after migration");
    // The boot id line and md5sum's `<digest>  /mem/keep` (not the echoed command).
    let lines = |s: &str| -> Vec<String> {
        s.lines()
            .map(str::trim)
            .filter(|l| {
                let uuid = l.len() == 36
                    && l.chars().filter(|c| *c == '-').count() == 4
                    && l.chars().all(|c| c == '-' || c.is_ascii_hexdigit());
                uuid || l.ends_with("  /mem/keep")
            })
            .map(str::to_string)
            .collect()
    };
    assert_eq!(lines(&before).len(), 2, "{before:?}");
    assert_eq!(
        lines(&after),
        lines(&before),
        "boot id or memory content changed: before {before:?}, after {after:?}"
    );
    target.stop_and_cleanup().await.expect("cleanup target");
}
