//! Privileged: NIC taps passed by fd. The agent's seal socket (real SCM_RIGHTS, real
//! TUNSETIFF on a real tap enslaved to a bridge) hands a launcher its VM's tap only
//! while the caller's cgroup names the pod the sealed spec is for; the launcher's
//! supervisor starts QEMU with `-netdev tap,fd=N`, keeps no fd itself, and the guest
//! gets a DHCP lease across the bridge and answers ping. The caller's cgroup file is
//! a stand-in (the test is one process): `TapPolicy::proc_root` points at it.

mod common;

use common::{guest_dir, is_root};
use hvx_api::seal::{SealKey, Sealed, Subject};
use hvx_node_agent::sealcheck::SealCheck;
use hvx_node_agent::tapfd::{TapClient, TapPolicy};
use hvx_vmm::console::SerialLog;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const WEB_UID: &str = "0b5e8c1a-4f2d-4c3b-9a7e-1d2c3b4a5f60";
const DB_UID: &str = "11111111-2222-3333-4444-555555555555";
const SUBNET: &str = "10.213.77";
/// The migrating VM's NIC (the same on both ends).
const MIGRATING_MAC: &str = "00:50:56:7a:00:02";

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {}", args.join(" "));
}

/// A bridge with a DHCP server (the overlay switch's part) and a persistent tap (the
/// agent's); all removed on drop, even when an assertion fails.
struct Switch {
    bridge: String,
    tap: String,
    dnsmasq: Option<Child>,
}

impl Drop for Switch {
    fn drop(&mut self) {
        if let Some(mut d) = self.dnsmasq.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        for dev in [&self.tap, &self.bridge] {
            let _ = Command::new("ip")
                .args(["link", "del", "dev", dev])
                .status();
        }
    }
}

/// How many fds of process `pid` are tun devices.
fn tun_fds(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|l| l == Path::new("/dev/net/tun"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn set_caller_pod(proc_root: &Path, uid: &str) {
    let dir = proc_root.join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("cgroup"),
        format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope\n", uid.replace('-', "_")),
    )
    .expect("cgroup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: make test-integration"]
async fn a_vm_boots_on_fd_passed_taps_and_no_other_pod_gets_them() {
    if !is_root() {
        eprintln!("SKIP: privileged test needs root");
        return;
    }
    let guest = guest_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm_id = "u-tapfd/web";
    let tap = hvx_api::launch::tap_name(vm_id, "ethernet0");
    let mut switch = Switch {
        bridge: format!("hvxtfb{}", std::process::id() % 100_000),
        tap: tap.clone(),
        dnsmasq: None,
    };
    ip(&["link", "add", &switch.bridge, "type", "bridge"]);
    ip(&[
        "addr",
        "add",
        &format!("{SUBNET}.1/24"),
        "dev",
        &switch.bridge,
    ]);
    ip(&["link", "set", &switch.bridge, "up"]);
    ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
    ip(&["link", "set", &tap, "up"]);

    // The agent's side: two launcher pods on this node, web and db.
    let policy = TapPolicy {
        proc_root: tmp.path().join("proc"),
        pod_logs: tmp.path().join("pods"),
        ..TapPolicy::default()
    };
    for (pod, uid) in [("shop-web", WEB_UID), ("shop-db", DB_UID)] {
        std::fs::create_dir_all(policy.pod_logs.join(format!("default_{pod}_{uid}")))
            .expect("pod dir");
    }
    let key = SealKey::new(b"0123456789abcdef0123456789abcdef");
    let socket = tmp.path().join("node/seal.sock");
    let server = tokio::spawn({
        let (socket, key, policy) = (socket.clone(), key.clone(), policy.clone());
        async move { hvx_node_agent::sealcheck::serve_with(&socket, Some(key), policy).await }
    });

    // The launcher of shop-web, with the spec the operator sealed for it.
    let spec = serde_json::json!({
        "namespace": "default", "application": "shop", "vmId": vm_id,
        "vm": {
            "name": "web", "cpu": {"sockets": 1, "coresPerSocket": 1}, "memoryMib": 256,
            "disks": [],
            "nics": [{"name": "ethernet0", "network": {"name": "lan"}, "macAddress": "00:50:56:7a:00:01"}]
        },
        "disks": [],
        "nics": [{"name": "ethernet0", "networkUid": "n-uid", "vni": 7, "tap": tap}]
    })
    .to_string();
    let seal = key.seal(
        &Subject {
            namespace: "default",
            pod: "shop-web",
            owner_uid: "u-tapfd",
        },
        Sealed::LaunchSpec,
        &spec,
    );
    let client = TapClient {
        path: socket.clone(),
        check: SealCheck {
            namespace: "default".into(),
            pod: "shop-web".into(),
            owner_uid: "u-tapfd".into(),
            spec,
            seal,
        },
    };
    set_caller_pod(&policy.proc_root, WEB_UID);

    // Not on the bridge yet: reported as waiting, nothing opened.
    let mut waiting = Vec::new();
    for _ in 0..40 {
        match client.waiting().await {
            Ok(w) if w.iter().any(|m| m.contains("socket")) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => {
                waiting = other.expect("web may ask");
                break;
            }
        }
    }
    assert_eq!(
        waiting,
        [format!("tap {tap} of NIC ethernet0 on the overlay switch")]
    );
    assert!(client.open().await.is_err(), "not ready: no fd");
    ip(&["link", "set", &tap, "master", &switch.bridge]);
    assert_eq!(client.waiting().await, Ok(Vec::new()));

    // The fd is the tap, opened by the agent (what it adds to a VM's start: one
    // round trip per QEMU start).
    let asked = std::time::Instant::now();
    let fds = client.open().await.expect("web gets its tap");
    eprintln!(
        "tap fd request answered in {:.2} ms",
        asked.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(fds.len(), 1);
    assert_eq!(fds[0].nic, "ethernet0");
    assert_eq!(
        hvx_node_agent::fdpass::tap_name(fds[0].fd.as_fd()).expect("TUNGETIFF"),
        tap
    );
    drop(fds);

    // shop-db's launcher replaying web's request: another pod UID, refused.
    set_caller_pod(&policy.proc_root, DB_UID);
    let refused = client.open().await.expect_err("db gets no tap of web");
    assert!(refused.contains("is not pod default/shop-web"), "{refused}");
    assert!(client.waiting().await.is_err());
    set_caller_pod(&policy.proc_root, WEB_UID);

    // DHCP on the bridge, as the overlay's gateway serves it.
    switch.dnsmasq = Some(
        Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--port=0",
                "--bind-interfaces",
                "--except-interface=lo",
                &format!("--interface={}", switch.bridge),
                &format!("--dhcp-range={SUBNET}.50,{SUBNET}.99,255.255.255.0,1h"),
                &format!("--dhcp-leasefile={}", tmp.path().join("leases").display()),
                "--pid-file=",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("dnsmasq"),
    );

    // The supervisor boots the guest on the fd.
    let disk = tmp.path().join("boot.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "vmdk", "-b"])
        .arg(guest.join("disk-stream.vmdk"))
        .arg(&disk)
        .status()
        .expect("qemu-img");
    assert!(st.success());
    let run_dir = tmp.path().join("run");
    // By name only: the supervisor asks the agent for the fd before QEMU starts.
    let vm = vm_spec(&disk, &run_dir, &tap, "00:50:56:7a:00:01", None);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let supervisor = tokio::spawn({
        let (vm, client) = (vm.clone(), client.clone());
        async move {
            hvx_node_agent::launcher::supervise::run(
                &vm,
                &hvx_vmm::vm::StartOptions::default(),
                &hvx_vmm::accel::ProbeOptions::default(),
                None,
                Some(&client),
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
        }
    });
    let mut log = SerialLog::new(&run_dir.join("serial.log"));
    let lease = log
        .wait_for("source=dhcp", Duration::from_secs(300))
        .await
        .expect("the guest got a DHCP lease over the fd-passed tap");
    let addr = lease
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("addr="))
        .and_then(|a| a.split('/').next())
        .expect("addr")
        .to_string();
    assert!(addr.starts_with(SUBNET), "{lease}");
    let ping = Command::new("ping")
        .args(["-c", "3", "-W", "2", &addr])
        .output()
        .expect("ping");
    assert!(
        ping.status.success(),
        "guest answers ping: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // QEMU holds the tap; the launcher (this process) no longer does.
    let qemu = std::fs::read_to_string(run_dir.join("qemu.pid")).expect("qemu pid");
    assert_eq!(tun_fds(qemu.trim()), 1, "QEMU inherited exactly the tap");
    assert_eq!(tun_fds("self"), 0, "the launcher closed its copy");

    let _ = stop_tx.send(());
    let exit = tokio::time::timeout(Duration::from_secs(90), supervisor)
        .await
        .expect("stops")
        .expect("join")
        .expect("run");
    assert_eq!(exit, hvx_vmm::vm::ExitKind::HostRequested);
    server.abort();
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("spawn");
    assert!(st.success(), "{args:?}");
}

/// Links and a network namespace made for one test; removed on drop.
#[derive(Default)]
struct Netdevs {
    links: Vec<String>,
    netns: Option<String>,
    dnsmasq: Option<Child>,
}

impl Drop for Netdevs {
    fn drop(&mut self) {
        if let Some(mut d) = self.dnsmasq.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        for l in &self.links {
            let _ = Command::new("ip").args(["link", "del", "dev", l]).status();
        }
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The test guest with one vmxnet3 NIC on `tap` (`fd`: already open, as a launcher
/// passes it; None: the supervisor asks the agent).
fn vm_spec(disk: &Path, run_dir: &Path, tap: &str, mac: &str, fd: Option<i32>) -> hvx_vmm::VmSpec {
    let mut spec: hvx_vmm::VmSpec = serde_json::from_value(serde_json::json!({
        "name": "web",
        "uuid": "421a5b3c-1111-4222-8333-444455556688",
        "cpu": {"sockets": 1, "cores": 1},
        "memory_mib": 256,
        "accelerator": "tcg",
        "controllers": [{"type": "pvscsi", "bus": 0, "pci_slot": 16}],
        "disks": [{"name": "boot", "path": disk, "format": "qcow2", "controller": "pvscsi",
                   "bus": 0, "unit": 3, "boot_order": 1}],
        "nics": [{"name": "ethernet0", "model": "vmxnet3", "mac": mac,
                  "pci_slot": 17, "backend": {"tap": {"name": tap}}}],
        "run_dir": run_dir,
        "restart_policy": {"policy": "never"},
        "shutdown_timeout_s": 30
    }))
    .expect("vm spec");
    spec.nics[0].backend = hvx_vmm::spec::NicBackend::Tap {
        name: tap.into(),
        fd,
    };
    spec
}

async fn pings(addr: &str, tries: u32) -> bool {
    for _ in 0..tries {
        let ok = Command::new("ping")
            .args(["-c", "1", "-W", "1", addr])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

/// The migration target runs as in a launcher pod without host network: its QEMU
/// in a network namespace of its own (the pod's), on a tap fd from the node's
/// namespace, listening on the namespace's address (the pod IP). The source agent
/// sends the VM there; the guest keeps its address and answers on the target's tap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: make test-integration"]
async fn a_vm_migrates_into_a_target_in_its_own_network_namespace() {
    use hvx_node_agent::agent::migration as agent_migration;
    use hvx_proto::v1 as pb;
    use hvx_proto::v1::migration_progress::Phase;
    use std::os::fd::AsRawFd;
    if !is_root() {
        eprintln!("SKIP: privileged test needs root");
        return;
    }
    const VM_UID: &str = "u-tapfd/web";
    const PSK: &[u8] = b"0123456789abcdef0123456789abcdef";
    const POD_IP: &str = "10.213.79.2";
    let guest = guest_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let n = std::process::id() % 100_000;
    let mut net = Netdevs::default();
    let bridge = format!("hvxtmb{n}");
    let (src_tap, dst_tap) = (format!("tfs{n}"), format!("tft{n}"));
    let (veth_host, veth_pod) = (format!("tfv{n}h"), format!("tfv{n}p"));
    let ns = format!("hvxtfm{n}");
    net.links = vec![
        src_tap.clone(),
        dst_tap.clone(),
        veth_host.clone(),
        bridge.clone(),
    ];
    net.netns = Some(ns.clone());
    // The overlay switch: a bridge with DHCP, both nodes' taps on it.
    ip(&["link", "add", &bridge, "type", "bridge"]);
    ip(&["addr", "add", "10.213.78.1/24", "dev", &bridge]);
    ip(&["link", "set", &bridge, "up"]);
    for t in [&src_tap, &dst_tap] {
        ip(&["tuntap", "add", "dev", t, "mode", "tap"]);
        ip(&["link", "set", t, "master", &bridge]);
        ip(&["link", "set", t, "up"]);
    }
    net.dnsmasq = Some(
        Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--port=0",
                "--bind-interfaces",
                "--except-interface=lo",
                &format!("--interface={bridge}"),
                "--dhcp-range=10.213.78.50,10.213.78.99,255.255.255.0,1h",
                &format!("--dhcp-leasefile={}", tmp.path().join("leases").display()),
                "--pid-file=",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("dnsmasq"),
    );
    // The target pod's network namespace, reachable at its pod IP.
    ip(&["netns", "add", &ns]);
    ip(&[
        "link", "add", &veth_host, "type", "veth", "peer", "name", &veth_pod,
    ]);
    ip(&["link", "set", &veth_pod, "netns", &ns]);
    ip(&["addr", "add", "10.213.79.1/24", "dev", &veth_host]);
    ip(&["link", "set", &veth_host, "up"]);
    for args in [
        vec!["addr", "add", "10.213.79.2/24", "dev", veth_pod.as_str()],
        vec!["link", "set", veth_pod.as_str(), "up"],
        vec!["link", "set", "lo", "up"],
    ] {
        let mut all = vec!["netns", "exec", ns.as_str(), "ip"];
        all.extend(args);
        ip(&all);
    }
    let qemu_in_pod = tmp.path().join("qemu-in-pod");
    std::fs::write(
        &qemu_in_pod,
        format!(
            "#!/bin/sh\nexec ip netns exec {ns} {} \"$@\"\n",
            hvx_vmm::argv::QEMU_BINARY
        ),
    )
    .expect("wrapper");
    sh(&["chmod", "755", &qemu_in_pod.display().to_string()]);

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
    let overlay = |name: &str| {
        let p = tmp.path().join(format!("disks/{name}.qcow2"));
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        sh(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            &base.display().to_string(),
            &p.display().to_string(),
        ]);
        p
    };
    let node_paths = |name: &str| {
        hvx_api::node::NodePaths::new(
            &tmp.path().join(name).join("lib"),
            &tmp.path().join(name).join("run"),
            name,
        )
    };

    // The source agent and its VM (QEMU in the node's namespace, on a passed fd).
    let agent = std::sync::Arc::new(
        hvx_node_agent::agent::Agent::open(hvx_node_agent::agent::AgentConfig::new(
            "node-a",
            std::net::Ipv4Addr::LOCALHOST,
            tmp.path().join("node-a/lib"),
            tmp.path().join("node-a/run"),
        ))
        .expect("agent"),
    );
    let src_run = node_paths("node-a").vm_run_dir(VM_UID);
    let tun = Path::new("/dev/net/tun");
    let src_fd = hvx_node_agent::fdpass::open_tap(tun, &src_tap).expect("source tap");
    let source = hvx_vmm::vm::Vm::start(
        &vm_spec(
            &overlay("a"),
            &src_run,
            &src_tap,
            MIGRATING_MAC,
            Some(src_fd.as_raw_fd()),
        ),
        hvx_vmm::Accel::Tcg,
        &hvx_vmm::vm::StartOptions::default(),
    )
    .await
    .expect("source starts");
    drop(src_fd);
    std::fs::write(
        src_run.join("status.json"),
        serde_json::json!({"phase": "Running", "restarts": 0, "qemu_pid": source.pid()})
            .to_string(),
    )
    .expect("status");
    let lease = SerialLog::new(&source.paths().serial_log)
        .wait_for("source=dhcp", Duration::from_secs(300))
        .await
        .expect("the guest got a lease");
    let addr = lease
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("addr="))
        .and_then(|a| a.split('/').next())
        .expect("addr")
        .to_string();
    assert!(pings(&addr, 10).await, "the guest answers on the source");

    // The target: as its launcher does in a pod, QEMU in the pod's namespace on a
    // passed fd, listening on the pod IP.
    let dst_run = node_paths("node-b").vm_run_dir(VM_UID);
    let dst_fd = hvx_node_agent::fdpass::open_tap(tun, &dst_tap).expect("target tap");
    let target = hvx_vmm::vm::Vm::start(
        &vm_spec(
            &overlay("b"),
            &dst_run,
            &dst_tap,
            MIGRATING_MAC,
            Some(dst_fd.as_raw_fd()),
        ),
        hvx_vmm::Accel::Tcg,
        &hvx_vmm::vm::StartOptions {
            incoming: true,
            qemu: qemu_in_pod.display().to_string(),
            ..hvx_vmm::vm::StartOptions::default()
        },
    )
    .await
    .expect("target starts");
    drop(dst_fd);
    let target_pid = target.pid().expect("pid").to_string();
    assert_ne!(
        std::fs::read_link(format!("/proc/{target_pid}/ns/net")).expect("target netns"),
        std::fs::read_link("/proc/self/ns/net").expect("own netns"),
        "the target QEMU runs in the pod's namespace"
    );
    let tls = dst_run.join(hvx_api::node::MIGRATION_TLS_DIR);
    hvx_vmm::migration::write_psk(&tls, PSK).expect("key");
    let endpoint = hvx_vmm::migration::TargetEndpoint {
        host: POD_IP.into(),
        migration_port: 4444,
        nbd_port: 10809,
    };
    hvx_vmm::migration::listen_incoming(
        target.qmp(),
        &endpoint,
        &["boot".to_string()],
        Some(&tls),
        false,
    )
    .await
    .expect("the target listens on the pod IP");
    let arrived = tokio::spawn(async move {
        let r = hvx_vmm::migration::finish_incoming(target.qmp(), Duration::from_secs(300))
            .await
            .map_err(|e| e.to_string());
        (target, r)
    });

    let mut rx = agent_migration::start(
        agent.clone(),
        pb::StartMigrationRequest {
            migration_uid: "mig-tapfd".into(),
            vm: Some(pb::VmRef {
                vm_uid: VM_UID.into(),
                name: "web".into(),
            }),
            target: Some(pb::MigrationEndpoint {
                host: POD_IP.into(),
                migration_port: 4444,
                nbd_port: 10809,
            }),
            max_downtime_ms: 300,
            allow_post_copy: false,
            bandwidth_bytes_per_second: 0,
            tls_psk: PSK.to_vec(),
            disk_names: vec!["boot".into()],
        },
    )
    .await
    .expect("migration starts");
    let done = tokio::time::timeout(
        Duration::from_secs(300),
        rx.wait_for(|p| {
            matches!(
                Phase::try_from(p.phase),
                Ok(Phase::Completed | Phase::Failed)
            )
        }),
    )
    .await
    .expect("migration ends in time")
    .expect("progress")
    .clone();
    assert_eq!(
        Phase::try_from(done.phase),
        Ok(Phase::Completed),
        "{done:?}"
    );
    let (target, r) = arrived.await.expect("join");
    r.expect("the target received the VM");
    assert_eq!(target.run_state().await.expect("state"), "running");
    // The guest keeps its address; now it answers through the target's tap.
    assert!(pings(&addr, 20).await, "the guest answers on the target");
    drop(source);
    drop(target);
}
