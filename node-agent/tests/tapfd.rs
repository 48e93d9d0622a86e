//! Privileged: NIC taps passed by fd. The agent's seal socket (real SCM_RIGHTS, real
//! TUNSETIFF on a real tap enslaved to a bridge) hands a launcher its VM's tap only
//! while the caller's cgroup names the pod the sealed spec is for; the launcher's
//! supervisor starts QEMU with `-netdev tap,fd=N`, keeps no fd itself, and the guest
//! gets a DHCP lease across the bridge and answers ping. The caller's cgroup file is
//! a stand-in (the test is one process): `TapPolicy::proc_root` points at it.

use hvx_api::seal::{SealKey, Sealed, Subject};
use hvx_node_agent::sealcheck::SealCheck;
use hvx_node_agent::tapfd::{TapClient, TapPolicy};
use hvx_vmm::console::SerialLog;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const WEB_UID: &str = "0b5e8c1a-4f2d-4c3b-9a7e-1d2c3b4a5f60";
const DB_UID: &str = "11111111-2222-3333-4444-555555555555";
const SUBNET: &str = "10.213.77";

fn guest_dir() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/build-guest.sh");
    let out = Command::new(&script)
        .output()
        .expect("run hack/build-guest.sh");
    assert!(
        out.status.success(),
        "build-guest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("guest dir")
            .trim(),
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

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

    // The fd is the tap, opened by the agent.
    let fds = client.open().await.expect("web gets its tap");
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
    let vm: hvx_vmm::VmSpec = serde_json::from_value(serde_json::json!({
        "name": "web",
        "cpu": {"sockets": 1, "cores": 1},
        "memory_mib": 256,
        "accelerator": "tcg",
        "controllers": [{"type": "pvscsi", "bus": 0, "pci_slot": 16}],
        "disks": [{"name": "boot", "path": disk, "format": "qcow2", "controller": "pvscsi",
                   "bus": 0, "unit": 0, "boot_order": 1}],
        "nics": [{"name": "ethernet0", "model": "vmxnet3", "mac": "00:50:56:7a:00:01",
                  "pci_slot": 17, "backend": {"tap": {"name": tap}}}],
        "run_dir": run_dir,
        "restart_policy": {"policy": "never"},
        "shutdown_timeout_s": 30
    }))
    .expect("vm spec");
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
