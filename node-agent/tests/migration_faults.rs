//! Privileged: fault injection in live migration. Two agents (a source and a target
//! node: their own store and run dirs on this machine) run in this process, the way
//! `hvx-node-agent` serves them; the VM is the test guest under TCG, started in the
//! agents' run dirs as its launcher would (`status.json` with QEMU's pid), writing an
//! fsync'd counter the whole time. An agent is "killed" by aborting its tasks and
//! dropping it (QEMU goes on alone, as it does when the agent process dies), and
//! "restarted" by opening a new one on the same directories.
//!
//! 1. The source agent dies mid-transfer: the restarted agent rolls back; the source
//!    keeps running, the target never does.
//! 2. A cancel races QEMU's completion (the cancel arrives after QEMU completed, before
//!    the agent saw it), with the target agent restarted mid-transfer on the way: the
//!    cancel loses, the target keeps running, the source never resumes.
//! 3. The source agent dies right after QEMU reported completion (before it recorded
//!    it): a rollback asked of that QEMU refuses, and the restarted agent finishes the
//!    migration (the stale copy quits) whether the operator cancels or re-attaches.
//!
//! After each: exactly one QEMU says `running`, with the same boot id, and the counter
//! has every value.
//!
//! `cargo test -p hvx-node-agent --test migration_faults -- --ignored` as root.

mod common;

use common::{guest_dir, is_root};
use hvx_node_agent::agent::migration::{self as agent_migration, SourceState};
use hvx_node_agent::agent::{Agent, AgentConfig};
use hvx_proto::v1 as pb;
use hvx_proto::v1::cancel_migration_response::Outcome;
use hvx_proto::v1::migration_progress::Phase;
use hvx_vmm::console::{SerialConsole, SerialLog};
use hvx_vmm::migration::{self, Rollback, TargetEndpoint};
use hvx_vmm::vm::{ExitKind, StartOptions, Vm};
use hvx_vmm::{Accel, VmSpec};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

const BOOT: Duration = Duration::from_secs(240);
const CMD: Duration = Duration::from_secs(30);
const MIGRATE: Duration = Duration::from_secs(300);
const VM_UID: &str = "app-uid/web";
const PSK: &[u8] = b"0123456789abcdef0123456789abcdef";

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("spawn");
    assert!(st.success(), "{args:?}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A test node: its directories, and its agent while it lives.
struct Node {
    name: &'static str,
    root: PathBuf,
    agent: Option<Arc<Agent>>,
}

impl Node {
    fn new(name: &'static str, tmp: &Path) -> Self {
        let mut n = Self {
            name,
            root: tmp.join(name),
            agent: None,
        };
        n.restart();
        n
    }

    fn agent(&self) -> Arc<Agent> {
        self.agent.clone().expect("agent up")
    }

    /// What a killed agent process leaves: QEMUs and files, no tasks.
    fn kill(&mut self) {
        if let Some(a) = self.agent.take() {
            a.abort_migrations();
        }
    }

    /// A new agent on the same directories.
    fn restart(&mut self) {
        self.kill();
        let config = AgentConfig::new(
            self.name,
            "127.0.0.1".parse().expect("ip"),
            self.root.join("lib"),
            self.root.join("run"),
        );
        self.agent = Some(Arc::new(Agent::open(config).expect("open agent")));
    }

    /// The VM's run dir on this node (whether or not its agent is up).
    fn run_dir(&self) -> PathBuf {
        hvx_api::node::NodePaths::new(&self.root.join("lib"), &self.root.join("run"), self.name)
            .vm_run_dir(VM_UID)
    }
}

/// The VM's spec on a node: its disk, its run dir there.
fn spec(disk: &Path, run_dir: &Path) -> VmSpec {
    let v = serde_json::json!({
        "name": "web",
        "uuid": "421a5b3c-1111-4222-8333-444455556677",
        "serial": "VMware-42 1a 5b 3c 11 11 42 22-83 33 44 44 55 55 66 77",
        "cpu": {"sockets": 1, "cores": 1},
        "memory_mib": 256,
        "accelerator": "tcg",
        "controllers": [{"type": "pvscsi", "bus": 0, "pci_slot": 16}],
        "disks": [{"name": "boot", "path": disk, "format": "qcow2", "controller": "pvscsi",
                   "bus": 0, "unit": 3, "boot_order": 1}],
        "nics": [{"name": "ethernet0", "model": "vmxnet3", "mac": "00:50:56:12:34:57",
                  "pci_slot": 17, "backend": {"user": {}}}],
        "run_dir": run_dir,
        "restart_policy": {"policy": "never"},
        "shutdown_timeout_s": 30
    });
    serde_json::from_value(v).expect("test spec parses")
}

/// What the launcher writes once QEMU runs the guest (the agent finds QEMU by it).
fn write_launcher_status(run_dir: &Path, pid: u32) {
    let s = serde_json::json!({"phase": "Running", "restarts": 0, "qemu_pid": pid});
    std::fs::write(run_dir.join("status.json"), s.to_string()).expect("status.json");
}

/// A fresh (empty) overlay over the shared base: what PrepareMigrationTarget makes.
fn empty_overlay(base: &Path, path: &Path) -> PathBuf {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("disk dir");
    let _ = std::fs::remove_file(path);
    let base = base.display().to_string();
    let out = path.display().to_string();
    sh(&[
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base, &out,
    ]);
    path.to_path_buf()
}

/// A target: QEMU waiting for the VM, and the launcher's side of it (resume when it
/// arrived) in a task that hands the VM back.
struct Incoming {
    endpoint: TargetEndpoint,
    task: JoinHandle<(Vm, Result<u64, String>)>,
}

async fn start_target(node: &Node, disk: &Path) -> Incoming {
    let run_dir = node.run_dir();
    let spec = spec(disk, &run_dir);
    let vm = Vm::start(
        &spec,
        Accel::Tcg,
        &StartOptions {
            incoming: true,
            ..StartOptions::default()
        },
    )
    .await
    .expect("start target");
    let tls = run_dir.join(hvx_api::node::MIGRATION_TLS_DIR);
    migration::write_psk(&tls, PSK).expect("target key");
    let endpoint = TargetEndpoint {
        host: "127.0.0.1".into(),
        migration_port: free_port(),
        nbd_port: free_port(),
    };
    migration::listen_incoming(
        vm.qmp(),
        &endpoint,
        &["boot".to_string()],
        Some(&tls),
        false,
    )
    .await
    .expect("target listens");
    std::fs::write(
        run_dir.join("status.json"),
        serde_json::json!({"phase": "Incoming", "qemu_pid": vm.pid()}).to_string(),
    )
    .expect("status.json");
    let task = tokio::spawn(async move {
        let r = migration::finish_incoming(vm.qmp(), MIGRATE)
            .await
            .map_err(|e| e.to_string());
        if let (Ok(_), Some(pid)) = (&r, vm.pid()) {
            write_launcher_status(vm.paths().qmp.parent().expect("run dir"), pid);
        }
        (vm, r)
    });
    Incoming { endpoint, task }
}

fn start_request(uid: &str, ep: &TargetEndpoint, bandwidth_mib: u64) -> pb::StartMigrationRequest {
    pb::StartMigrationRequest {
        migration_uid: uid.into(),
        vm: Some(pb::VmRef {
            vm_uid: VM_UID.into(),
            name: "web".into(),
        }),
        target: Some(pb::MigrationEndpoint {
            host: ep.host.clone(),
            migration_port: u32::from(ep.migration_port),
            nbd_port: u32::from(ep.nbd_port),
        }),
        max_downtime_ms: 300,
        allow_post_copy: false,
        bandwidth_bytes_per_second: bandwidth_mib << 20,
        tls_psk: PSK.to_vec(),
        disk_names: vec!["boot".into()],
    }
}

fn cancel_request(uid: &str) -> pb::CancelMigrationRequest {
    pb::CancelMigrationRequest {
        migration_uid: uid.into(),
        vm: Some(pb::VmRef {
            vm_uid: VM_UID.into(),
            name: "web".into(),
        }),
    }
}

fn phase(p: &pb::MigrationProgress) -> Phase {
    Phase::try_from(p.phase).unwrap_or(Phase::Unspecified)
}

async fn wait_phase(
    rx: &mut tokio::sync::watch::Receiver<pb::MigrationProgress>,
    want: &[Phase],
) -> pb::MigrationProgress {
    let p = tokio::time::timeout(MIGRATE, rx.wait_for(|p| want.contains(&phase(p))))
        .await
        .expect("phase in time")
        .expect("progress channel");
    p.clone()
}

/// Waits until QEMU says the migration completed on the source (`postmigrate`).
async fn wait_postmigrate(vm: &Vm) {
    let deadline = Instant::now() + MIGRATE;
    loop {
        let s = vm.run_state().await.expect("source state");
        if s == "postmigrate" {
            return;
        }
        assert!(Instant::now() < deadline, "source still {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The guest's boot id and counter, read over a run dir's serial console; checks
/// every counter value up to the last one is there, in order.
async fn guest_view(run_dir: &Path) -> (String, u64) {
    let mut con = SerialConsole::connect(&run_dir.join("serial.sock"))
        .await
        .expect("console");
    let out = con
        .run(
            // One snapshot for both numbers: the writer appends meanwhile.
            "cat /proc/sys/kernel/random/boot_id; cp /data/counter /tmp/c; echo counter:$(wc -l < /tmp/c):$(tail -n 1 /tmp/c)",
            CMD,
        )
        .await
        .expect("guest answers");
    let boot_id = out.lines().next().unwrap_or_default().trim().to_string();
    let line = out
        .lines()
        .find(|l| l.starts_with("counter:"))
        .unwrap_or_else(|| panic!("no counter in {out:?}"));
    let mut f = line.trim().split(':').skip(1);
    let lines: u64 = f.next().unwrap_or("").trim().parse().expect("line count");
    let last: u64 = f.next().unwrap_or("").trim().parse().expect("last value");
    // Values 0..=last, one a line: a lost write shows as fewer lines than values.
    assert_eq!(lines, last + 1, "counter lost values: {out:?}");
    (boot_id, last)
}

/// Exactly one of the QEMUs runs the guest.
async fn assert_one_running(vms: &[(&str, Option<&Vm>)]) {
    let mut running = Vec::new();
    for (name, vm) in vms {
        if let Some(vm) = vm
            && vm.run_state().await.ok().as_deref() == Some("running")
        {
            running.push(*name);
        }
    }
    assert_eq!(running.len(), 1, "running copies: {running:?}");
}

/// Waits for the guest's counter to move past `after` (the guest runs and writes).
async fn counter_moves(run_dir: &Path, boot_id: &str, after: u64) -> u64 {
    let deadline = Instant::now() + CMD;
    loop {
        let (id, last) = guest_view(run_dir).await;
        assert_eq!(id, boot_id, "the guest rebooted");
        if last > after {
            return last;
        }
        assert!(Instant::now() < deadline, "counter stuck at {last}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: real QEMU under TCG (root)"]
async fn killed_agents_and_racing_cancels_leave_exactly_one_copy() {
    assert!(is_root(), "run as root");
    let tmp = tempfile::tempdir().expect("tempdir");
    let guest = guest_dir();
    let base = tmp.path().join("base.qcow2");
    sh(&[
        "qemu-img",
        "convert",
        "-q",
        "-f",
        "vmdk",
        "-O",
        "qcow2",
        &guest.join("disk-stream.vmdk").display().to_string(),
        &base.display().to_string(),
    ]);
    let mut a = Node::new("node-a", tmp.path());
    let mut b = Node::new("node-b", tmp.path());

    // The VM on node A, writing a counter (fsync'd: `sync` after each line).
    let disk_a = empty_overlay(&base, &tmp.path().join("disks/a1.qcow2"));
    let mut on_a = Vm::start(
        &spec(&disk_a, &a.run_dir()),
        Accel::Tcg,
        &StartOptions::default(),
    )
    .await
    .expect("start source");
    write_launcher_status(&a.run_dir(), on_a.pid().expect("pid"));
    SerialLog::new(&on_a.paths().serial_log)
        .wait_for("HVX-GUEST ready", BOOT)
        .await
        .expect("guest ready");
    let mut con = SerialConsole::connect(&on_a.paths().serial)
        .await
        .expect("console");
    con.run(
        "(i=0; while true; do echo $i >> /data/counter; sync; i=$((i+1)); sleep 0.1; done) >/dev/null 2>&1 & sleep 1",
        CMD,
    )
    .await
    .expect("start the counter");
    drop(con);
    let (boot_id, c0) = guest_view(&a.run_dir()).await;

    // 1. The source agent dies mid-transfer (pre-copy, slowed down): QEMU goes on
    // alone and stops at pre-switchover waiting for an agent. The restarted agent,
    // asked again by the operator, rolls back: the source keeps the VM.
    let target = start_target(
        &b,
        &empty_overlay(&base, &tmp.path().join("disks/b1.qcow2")),
    )
    .await;
    let req = start_request("mig-1", &target.endpoint, 4);
    let mut rx = agent_migration::start(a.agent(), req.clone())
        .await
        .expect("start");
    wait_phase(&mut rx, &[Phase::PreCopy]).await;
    a.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.restart();
    let mut rx = agent_migration::start(a.agent(), req.clone())
        .await
        .expect("re-attach");
    let last = wait_phase(&mut rx, &[Phase::Completed, Phase::Failed]).await;
    assert_eq!(phase(&last), Phase::Failed, "{last:?}");
    assert!(last.message.contains("rolled back"), "{last:?}");
    let record = agent_migration::read_record(&a.run_dir()).expect("record");
    assert_eq!(record.state, SourceState::Failed);
    // The target never got the VM (its incoming migration failed with the source's
    // cancel): its launcher would end it.
    let (doomed, received) = tokio::time::timeout(MIGRATE, target.task)
        .await
        .expect("target ends")
        .expect("target task");
    assert!(received.is_err(), "the target resumed a rolled-back VM");
    assert_one_running(&[("node-a", Some(&on_a)), ("node-b", Some(&doomed))]).await;
    drop(doomed);
    let c1 = counter_moves(&a.run_dir(), &boot_id, c0).await;
    // Cancelling it now changes nothing.
    let again = agent_migration::cancel(&a.agent(), &cancel_request("mig-1"))
        .await
        .expect("cancel");
    assert_eq!(again, Outcome::RolledBack);
    assert_eq!(on_a.run_state().await.expect("state"), "running");

    // 2. A cancel racing completion: the source agent's task is held right after
    // QEMU completed (it waits for the migration's lock to record the end), the
    // cancel comes then. On the way the target agent restarts mid-transfer (it is not
    // on the data path: nothing changes).
    let disk_b = empty_overlay(&base, &tmp.path().join("disks/b2.qcow2"));
    let target = start_target(&b, &disk_b).await;
    let req = start_request("mig-2", &target.endpoint, 0);
    let mut rx = agent_migration::start(a.agent(), req.clone())
        .await
        .expect("start");
    let held = a.agent().lock("migration/mig-2").await;
    wait_phase(&mut rx, &[Phase::PreCopy, Phase::Switchover]).await;
    b.restart();
    wait_postmigrate(&on_a).await;
    let agent = a.agent();
    let cancel =
        tokio::spawn(
            async move { agent_migration::cancel(&agent, &cancel_request("mig-2")).await },
        );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !cancel.is_finished(),
        "the cancel did not wait for the source to settle"
    );
    assert_eq!(on_a.run_state().await.expect("state"), "postmigrate");
    drop(held);
    let outcome = cancel.await.expect("cancel task").expect("cancel");
    assert_eq!(outcome, Outcome::Completed, "the cancel lost the race");
    let last = wait_phase(&mut rx, &[Phase::Completed, Phase::Failed]).await;
    assert_eq!(phase(&last), Phase::Completed, "{last:?}");
    let (mut on_b, received) = tokio::time::timeout(MIGRATE, target.task)
        .await
        .expect("target resumes")
        .expect("target task");
    received.expect("the target received the VM");
    assert_eq!(
        tokio::time::timeout(CMD, on_a.wait_exit())
            .await
            .expect("source quits"),
        ExitKind::Migrated
    );
    assert_one_running(&[("node-a", None), ("node-b", Some(&on_b))]).await;
    drop(on_a);
    // The restarted target agent, asked by the operator to drop its side (what
    // `finish` does), leaves the VM alone.
    let t = agent_migration::cancel(&b.agent(), &cancel_request("mig-2"))
        .await
        .expect("target cancel");
    assert_eq!(t, Outcome::Unspecified);
    assert_eq!(on_b.run_state().await.expect("state"), "running");
    let c2 = counter_moves(&b.run_dir(), &boot_id, c1).await;

    // 3. Back to A; the source agent (B's) dies right after QEMU completed, before it
    // wrote that down: its record says Started.
    let disk_a2 = empty_overlay(&base, &tmp.path().join("disks/a2.qcow2"));
    let target = start_target(&a, &disk_a2).await;
    let req = start_request("mig-3", &target.endpoint, 0);
    let _rx = agent_migration::start(b.agent(), req.clone())
        .await
        .expect("start");
    let held = b.agent().lock("migration/mig-3").await;
    wait_postmigrate(&on_b).await;
    // Killed while its task waits to record the completion; the lock goes after.
    b.kill();
    drop(held);
    let record = agent_migration::read_record(&b.run_dir()).expect("record");
    assert_eq!(record.state, SourceState::Started, "{record:?}");
    // What a cancel racing completion does at the QEMU level: refused, nothing touched.
    assert_eq!(
        migration::rollback(on_b.qmp(), &["boot".to_string()]).await,
        Rollback::Completed
    );
    assert_eq!(on_b.run_state().await.expect("state"), "postmigrate");
    let (on_a2, received) = tokio::time::timeout(MIGRATE, target.task)
        .await
        .expect("target resumes")
        .expect("target task");
    received.expect("the target received the VM");
    assert_one_running(&[("node-a", Some(&on_a2)), ("node-b", Some(&on_b))]).await;
    // The restarted agent: the operator's cancel (it saw the agent die) loses, and
    // the stale copy quits; a re-attach reports Completed.
    b.restart();
    let outcome = agent_migration::cancel(&b.agent(), &cancel_request("mig-3"))
        .await
        .expect("cancel after restart");
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(
        tokio::time::timeout(CMD, on_b.wait_exit())
            .await
            .expect("stale copy quits"),
        ExitKind::Migrated
    );
    let mut rx = agent_migration::start(b.agent(), req)
        .await
        .expect("re-attach");
    let last = wait_phase(&mut rx, &[Phase::Completed, Phase::Failed]).await;
    assert_eq!(phase(&last), Phase::Completed, "{last:?}");
    assert_eq!(
        agent_migration::read_record(&b.run_dir()).map(|r| r.state),
        Some(SourceState::Completed)
    );
    assert_one_running(&[("node-a", Some(&on_a2))]).await;
    counter_moves(&a.run_dir(), &boot_id, c2).await;
    drop(on_b);
    drop(on_a2);
}
