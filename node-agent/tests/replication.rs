//! Privileged: replicated VM disks between two nodes (issue 18, node level). Two
//! agents run in this process, each on its own store and run dirs; the VM's QEMU runs
//! in a network namespace of its own (as in a launcher pod) and reaches the replica
//! node's agent (host network, `node_ip` on a veth) over that veth only. The guest is
//! the test guest under TCG, writing a counter to its disk: each value is appended,
//! `sync`ed, then acknowledged on the serial line (`ACK <n>`).
//!
//! 1. Synchronous replication in sync, then the source node dies without warning
//!    (QEMU SIGKILLed, its agent gone, the replica daemon killed too): a QEMU started
//!    on the replica node's files alone (base + replica overlay) boots the VM, and
//!    every acknowledged counter value is on its disk.
//! 2. The replica becomes unreachable mid-run (its daemon dies): the replication
//!    turns Broken with QEMU's reason, and the VM keeps running and writing. A new
//!    generation of the replica gets in sync again; then the replica's agent restarts
//!    and serves it again from its record before the mirror gives up: still in sync.
//!
//! `cargo test -p hvx-node-agent --test replication -- --ignored --test-threads=1` as
//! root.

mod common;

use common::{guest_dir, is_root};
use hvx_node_agent::agent::replica;
use hvx_node_agent::agent::{Agent, AgentConfig};
use hvx_proto::v1 as pb;
use hvx_proto::v1::replication_status::State;
use hvx_storage::sources::ImportSource;
use hvx_vmm::console::{SerialConsole, SerialLog};
use hvx_vmm::vm::{StartOptions, Vm};
use hvx_vmm::{Accel, VmSpec};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(240);
const CMD: Duration = Duration::from_secs(30);
const SYNC: Duration = Duration::from_secs(120);
const VM_UID: &str = "app-uid/web";
const DISK: &str = "boot";
const PSK: &[u8] = b"0123456789abcdef0123456789abcdef";

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {args:?}");
}

/// Two test nodes' network: the VM's namespace and a veth to the replica node's.
struct Net {
    ns: String,
    veth: String,
    /// The replica node's address (root namespace end of the veth).
    node_ip: String,
}

impl Net {
    fn new(tag: &str, subnet: u8) -> Self {
        let n = std::process::id() % 100_000;
        let ns = format!("hvxrp{tag}{n}");
        let (veth, peer) = (format!("rp{tag}{n}h"), format!("rp{tag}{n}p"));
        // Leftovers of an earlier run that died (usually none: errors are expected).
        for args in [["netns", "del", &ns], ["link", "del", &veth]] {
            let _ = Command::new("ip")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status();
        }
        ip(&["netns", "add", &ns]);
        let net = Self {
            ns: ns.clone(),
            veth: veth.clone(),
            node_ip: format!("10.213.{subnet}.1"),
        };
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns]);
        ip(&["addr", "add", &format!("{}/24", net.node_ip), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        let inside = format!("10.213.{subnet}.2/24");
        for args in [
            vec!["addr", "add", inside.as_str(), "dev", peer.as_str()],
            vec!["link", "set", peer.as_str(), "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut all = vec!["netns", "exec", ns.as_str(), "ip"];
            all.extend(args);
            ip(&all);
        }
        net
    }

    /// A QEMU wrapper that runs it in the VM's namespace.
    fn qemu_wrapper(&self, dir: &Path) -> String {
        let p = dir.join(format!("qemu-in-{}", self.ns));
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
                self.ns,
                hvx_vmm::argv::QEMU_BINARY
            ),
        )
        .expect("wrapper");
        let st = Command::new("chmod")
            .args(["755", &p.display().to_string()])
            .status()
            .expect("chmod");
        assert!(st.success());
        p.display().to_string()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A test node: its directories and its agent while it lives.
struct Node {
    name: &'static str,
    root: PathBuf,
    node_ip: String,
    agent: Option<Arc<Agent>>,
}

impl Node {
    fn new(name: &'static str, tmp: &Path, node_ip: &str) -> Self {
        let mut n = Self {
            name,
            root: tmp.join(name),
            node_ip: node_ip.into(),
            agent: None,
        };
        n.restart();
        n
    }

    fn agent(&self) -> Arc<Agent> {
        self.agent.clone().expect("agent up")
    }

    /// What the node's death leaves of the agent: files only (its replica daemons die
    /// with it, as their parent-death signal makes them).
    fn kill(&mut self) {
        if let Some(a) = self.agent.take() {
            a.kill_replicas();
            a.abort_migrations();
        }
    }

    fn restart(&mut self) {
        self.kill();
        let config = AgentConfig::new(
            self.name,
            self.node_ip.parse().expect("ip"),
            self.root.join("lib"),
            self.root.join("run"),
        );
        self.agent = Some(Arc::new(Agent::open(config).expect("open agent")));
    }

    fn run_dir(&self) -> PathBuf {
        hvx_api::node::NodePaths::new(&self.root.join("lib"), &self.root.join("run"), self.name)
            .vm_run_dir(VM_UID)
    }

    /// Imports the test guest's disk as a base here; returns its digest.
    async fn import_base(&self) -> String {
        let base = self
            .agent()
            .store
            .import(
                &ImportSource::Local {
                    dir: guest_dir(),
                    entry: "disk-stream.vmdk".into(),
                },
                None,
                None,
            )
            .await
            .expect("import base");
        base.digest
    }

    /// The VM disk's active overlay file here.
    fn disk_path(&self) -> PathBuf {
        let (ns, name) = hvx_api::node::vm_overlay_ref(VM_UID, DISK);
        let a = self.agent();
        let meta = a.store.load_disk(&ns, &name).expect("disk here");
        a.store.disk_view(&meta).expect("view").active_path
    }
}

fn vm_ref() -> Option<pb::VmRef> {
    Some(pb::VmRef {
        vm_uid: VM_UID.into(),
        name: "web".into(),
    })
}

fn spec(disk: &Path, run_dir: &Path) -> VmSpec {
    serde_json::from_value(serde_json::json!({
        "name": "web",
        "uuid": "421a5b3c-1111-4222-8333-444455556699",
        "cpu": {"sockets": 1, "cores": 1},
        "memory_mib": 256,
        "accelerator": "tcg",
        "controllers": [{"type": "pvscsi", "bus": 0, "pci_slot": 16}],
        "disks": [{"name": DISK, "path": disk, "format": "qcow2", "controller": "pvscsi",
                   "bus": 0, "unit": 3, "boot_order": 1}],
        "nics": [{"name": "ethernet0", "model": "vmxnet3", "mac": "00:50:56:12:34:58",
                  "pci_slot": 17, "backend": {"user": {}}}],
        "run_dir": run_dir,
        "restart_policy": {"policy": "never"},
        "shutdown_timeout_s": 30
    }))
    .expect("test spec parses")
}

/// Boots the VM on `node` (QEMU through `qemu`, its launcher's status written so the
/// agent finds it) and waits for the guest.
async fn boot(node: &Node, qemu: &str) -> Vm {
    let vm = Vm::start(
        &spec(&node.disk_path(), &node.run_dir()),
        Accel::Tcg,
        &StartOptions {
            qemu: qemu.into(),
            ..StartOptions::default()
        },
    )
    .await
    .expect("start QEMU");
    let status = serde_json::json!({"phase": "Running", "restarts": 0, "qemu_pid": vm.pid()});
    std::fs::write(node.run_dir().join("status.json"), status.to_string()).expect("status");
    SerialLog::new(&vm.paths().serial_log)
        .wait_for("HVX-GUEST ready", BOOT)
        .await
        .expect("guest ready");
    vm
}

/// The replica on `replica_node`, and the VM's QEMU on `vm_node` mirroring into it.
async fn replicate(
    vm_node: &Node,
    replica_node: &Node,
    digest: &str,
    generation: u64,
) -> pb::ReplicaEndpoint {
    let ep = replica::prepare(
        &replica_node.agent(),
        &pb::PrepareReplicaRequest {
            vm: vm_ref(),
            disk_name: DISK.into(),
            base_digest: digest.into(),
            virtual_bytes: 0,
            tls_psk: PSK.to_vec(),
            generation,
        },
    )
    .await
    .expect("prepare replica");
    assert_eq!(ep.host, replica_node.node_ip);
    let s = replica::start_replication(
        &vm_node.agent(),
        &pb::StartReplicationRequest {
            vm: vm_ref(),
            disk_name: DISK.into(),
            replica: Some(ep.clone()),
            mode: pb::ReplicationMode::Synchronous as i32,
            tls_psk: PSK.to_vec(),
        },
    )
    .await
    .expect("start replication");
    assert_ne!(s.state, State::Broken as i32, "{s:?}");
    let until = Instant::now() + SYNC;
    loop {
        let s = get(vm_node).await;
        assert_ne!(s.state, State::Broken as i32, "{s:?}");
        if s.state == State::InSync as i32 {
            assert_eq!(s.mode, pb::ReplicationMode::Synchronous as i32);
            break;
        }
        assert!(Instant::now() < until, "not in sync: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ep
}

async fn get(node: &Node) -> pb::ReplicationStatus {
    replica::get_replication(
        &node.agent(),
        &pb::GetReplicationRequest {
            vm: vm_ref(),
            disk_name: DISK.into(),
        },
    )
    .await
    .expect("get replication")
}

/// Starts the guest's counter: append, sync, then acknowledge on the serial line.
async fn start_counter(vm: &Vm) {
    let mut con = SerialConsole::connect(&vm.paths().serial)
        .await
        .expect("console");
    con.run(
        "(i=0; while true; do echo $i >> /data/counter; sync; echo ACK $i > /dev/ttyS0; i=$((i+1)); sleep 0.1; done) >/dev/null 2>&1 & sleep 1",
        CMD,
    )
    .await
    .expect("start the counter");
}

/// The highest value the guest acknowledged, from the serial log.
fn last_ack(vm: &Vm) -> Option<u64> {
    let log = std::fs::read_to_string(&vm.paths().serial_log).unwrap_or_default();
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("ACK "))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .max()
}

async fn acks_pass(vm: &Vm, past: u64) -> u64 {
    let until = Instant::now() + SYNC;
    loop {
        if let Some(n) = last_ack(vm)
            && n >= past
        {
            return n;
        }
        assert!(Instant::now() < until, "guest stopped acknowledging writes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: real QEMU under TCG, network namespaces (root)"]
async fn failover_boots_from_the_replica_with_every_acknowledged_write() {
    if !is_root() {
        eprintln!("SKIP: privileged test needs root");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let net = Net::new("f", 91);
    let qemu = net.qemu_wrapper(tmp.path());
    let mut a = Node::new("node-a", tmp.path(), "127.0.0.1");
    let mut b = Node::new("node-b", tmp.path(), &net.node_ip);
    let digest = a.import_base().await;
    assert_eq!(b.import_base().await, digest, "bases are content-addressed");
    let (ns, name) = hvx_api::node::vm_overlay_ref(VM_UID, DISK);
    a.agent()
        .store
        .create_disk(&ns, &name, &digest, None)
        .await
        .expect("overlay on A");

    let on_a = boot(&a, &qemu).await;
    replicate(&a, &b, &digest, 1).await;
    start_counter(&on_a).await;
    let first = acks_pass(&on_a, 0).await;
    // Well past the first: the counter runs with the mirror in the write path.
    acks_pass(&on_a, first + 20).await;
    let s = get(&a).await;
    assert_eq!(s.state, State::InSync as i32, "{s:?}");

    // Node A dies without warning: QEMU SIGKILLed, its agent gone.
    let pid = on_a.pid().expect("QEMU pid");
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let acked = last_ack(&on_a).expect("acknowledged values");
    a.kill();
    drop(on_a);
    // Nothing graceful on B either: its agent (and the replica daemon) is killed and
    // only the files are left.
    b.kill();
    b.restart();
    replica::stop(
        &b.agent(),
        &pb::StopReplicaRequest {
            vm: vm_ref(),
            disk_name: DISK.into(),
            discard: false,
        },
    )
    .await
    .expect("stop replica");
    let on_b = boot(&b, hvx_vmm::argv::QEMU_BINARY).await;
    let mut con = SerialConsole::connect(&on_b.paths().serial)
        .await
        .expect("console on B");
    let out = con
        .run(
            "i=0; bad=0; while read v; do [ \"$v\" = \"$i\" ] || bad=1; i=$((i+1)); done < /data/counter; echo counter:$bad:$i",
            CMD,
        )
        .await
        .expect("guest on B answers");
    let line = out
        .lines()
        .find(|l| l.starts_with("counter:"))
        .unwrap_or_else(|| panic!("no counter in {out:?}"));
    let mut f = line.trim().split(':').skip(1);
    let bad = f.next().unwrap_or_default();
    let values: u64 = f.next().unwrap_or_default().parse().expect("count");
    eprintln!("acknowledged 0..={acked}; the replica holds {values} values in order");
    assert_eq!(bad, "0", "values out of order or torn: {out:?}");
    assert!(
        values > acked,
        "the replica lost acknowledged writes: acknowledged 0..={acked}, found {values} values"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: real QEMU under TCG, network namespaces (root)"]
async fn an_unreachable_replica_breaks_replication_and_the_vm_runs_on() {
    if !is_root() {
        eprintln!("SKIP: privileged test needs root");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let net = Net::new("u", 92);
    let qemu = net.qemu_wrapper(tmp.path());
    let a = Node::new("node-a", tmp.path(), "127.0.0.1");
    let mut b = Node::new("node-b", tmp.path(), &net.node_ip);
    let digest = a.import_base().await;
    b.import_base().await;
    let (ns, name) = hvx_api::node::vm_overlay_ref(VM_UID, DISK);
    a.agent()
        .store
        .create_disk(&ns, &name, &digest, None)
        .await
        .expect("overlay on A");
    let on_a = boot(&a, &qemu).await;
    replicate(&a, &b, &digest, 1).await;
    start_counter(&on_a).await;
    let n0 = acks_pass(&on_a, 0).await;

    // The replica node's agent dies mid-run, and its replica daemon with it.
    b.kill();
    let broke = Instant::now();
    let s = loop {
        let s = get(&a).await;
        if s.state == State::Broken as i32 {
            break s;
        }
        assert!(
            broke.elapsed() < Duration::from_secs(60),
            "replication still {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("broken after {:?}: {}", broke.elapsed(), s.message);
    assert!(!s.message.is_empty(), "{s:?}");
    // Reported again from the record (QEMU's job is cleared).
    assert_eq!(get(&a).await.state, State::Broken as i32);
    // The guest never stopped: it keeps writing, unreplicated.
    let n1 = last_ack(&on_a).unwrap_or(n0);
    acks_pass(&on_a, n1 + 10).await;
    assert_eq!(on_a.run_state().await.expect("state"), "running");

    // A new replica (the next generation) on the returning node: in sync again.
    b.restart();
    replicate(&a, &b, &digest, 2).await;
    let n2 = last_ack(&on_a).unwrap_or(n1);
    acks_pass(&on_a, n2 + 5).await;

    // The replica's agent restarts (its daemon dies with it) and serves the recorded
    // replica again on the same port within the NBD client's reconnect delay: the
    // mirror reconnects and stays in sync, nothing to rebuild.
    b.kill();
    b.restart();
    assert_eq!(
        replica::restore(&b.agent()).await,
        1,
        "the replica is served again"
    );
    let n3 = last_ack(&on_a).unwrap_or(n2);
    acks_pass(&on_a, n3 + 10).await;
    let s = get(&a).await;
    assert_eq!(s.state, State::InSync as i32, "{s:?}");
    assert_eq!(s.replica.expect("endpoint").generation, 2);
    replica::stop_replication(
        &a.agent(),
        &pb::StopReplicationRequest {
            vm: vm_ref(),
            disk_name: DISK.into(),
        },
    )
    .await
    .expect("stop replication");
    replica::stop(
        &b.agent(),
        &pb::StopReplicaRequest {
            vm: vm_ref(),
            disk_name: DISK.into(),
            discard: true,
        },
    )
    .await
    .expect("discard replica");
    assert_eq!(on_a.run_state().await.expect("state"), "running");
}
