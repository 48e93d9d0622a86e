//! Privileged: the real `hvx-node-agent` in its own network namespace (a test node
//! with a veth to this host), driven over gRPC the way the operator drives it:
//! import the VMware test guest's streamOptimized VMDK from an HTTP server, create a
//! VM overlay, put a network with a VM port on the node, survive a restart (the
//! persisted network comes back), clean everything up; and mutual TLS refuses a
//! client without a certificate.
//!
//! `cargo test -p hvx-node-agent --test agent -- --ignored --test-threads=1` as root.

mod common;

use common::{guest_dir, is_root};
use hvx_proto::v1 as pb;
use hvx_proto::v1::node_agent_client::NodeAgentClient;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const AGENT: &str = env!("CARGO_BIN_EXE_hvx-node-agent");
const HOST_IP: &str = "10.250.77.254";
const NODE_IP: &str = "10.250.77.1";
const VNI: u32 = 7077;

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A node: netns + veth, removed (with whatever runs in it) on drop.
struct TestNode {
    netns: String,
    host_veth: String,
    root: tempfile::TempDir,
    agent: Option<Child>,
    /// Extra environment of the agents started here.
    env: Vec<(String, String)>,
}

impl TestNode {
    fn new() -> Self {
        let id = std::process::id() % 100_000;
        let netns = format!("hvxat{id}");
        let host_veth = format!("hvxath{id}");
        let _ = Command::new("ip")
            .args(["netns", "del", &netns])
            .stderr(Stdio::null())
            .status();
        sh(&["ip", "netns", "add", &netns]);
        sh(&[
            "ip", "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns",
            &netns,
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            &host_veth,
        ]);
        sh(&["ip", "link", "set", &host_veth, "up"]);
        for cmd in [
            vec!["ip", "addr", "add", "10.250.77.1/24", "dev", "eth0"],
            vec!["ip", "link", "set", "eth0", "up"],
            vec!["ip", "link", "set", "lo", "up"],
        ] {
            let mut a = vec!["ip", "netns", "exec", netns.as_str()];
            a.extend(cmd);
            sh(&a);
        }
        Self {
            netns,
            host_veth,
            root: tempfile::tempdir().expect("tempdir"),
            agent: None,
            env: Vec::new(),
        }
    }

    fn start_agent(&mut self, port: u16, tls_dir: Option<&Path>) {
        let root = self.root.path().to_path_buf();
        self.agent = Some(self.spawn_agent("test-node", port, &root, tls_dir));
    }

    /// An agent process in this netns with its own node name and directories (a
    /// second node for moves; the caller kills it).
    fn spawn_agent(&self, name: &str, port: u16, root: &Path, tls_dir: Option<&Path>) -> Child {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, AGENT])
            .args(["--node-name", name, "--node-ip", NODE_IP])
            .arg(format!("--listen={NODE_IP}:{port}"))
            .arg(format!("--metrics-listen={NODE_IP}:{}", port + 1))
            // Two agents may share this netns (and its loopback).
            .arg(format!("--vm-metrics-listen=127.0.0.1:{}", port + 2))
            .arg(format!("--store-root={}", root.join("lib").display()))
            .arg(format!("--run-root={}", root.join("run").display()))
            .args(["--label-node", "false"])
            .env("RUST_LOG", "info")
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(d) = tls_dir {
            cmd.arg(format!("--tls-dir={}", d.display()));
        }
        cmd.spawn().expect("start agent")
    }

    fn stop_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn links(&self) -> String {
        sh(&["ip", "-n", &self.netns, "-o", "link", "show"])
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.stop_agent();
        // dnsmasq of the test network runs in the netns: end it before the netns.
        let _ = Command::new("pkill")
            .args(["-f", &self.root.path().display().to_string()])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        // The networks' gateway namespaces were named in the agent's own mount
        // namespace (as in a pod); in the shared /run the names are left as empty
        // files when an agent stopped with networks up.
        for vni in [VNI, VNI + 1] {
            let name = format!("/run/netns/hvx-n-{vni}");
            if Path::new(&name).exists() {
                let _ = std::fs::remove_file(&name);
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .status();
    }
}

/// Serves one file over HTTP/1.0 on the host side of the veth.
fn serve_file(path: PathBuf) -> u16 {
    let listener = TcpListener::bind(format!("{HOST_IP}:0")).expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = std::fs::read(&path).expect("read disk");
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(&body);
        }
    });
    port
}

fn free_port() -> u16 {
    // Ports are per netns; any high port free on the host is very likely free there.
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn connect(
    port: u16,
    tls: Option<ClientTlsConfig>,
) -> Result<NodeAgentClient<Channel>, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{NODE_IP}:{port}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2));
    if let Some(t) = tls {
        ep = ep.tls_config(t).map_err(|e| e.to_string())?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match ep.connect().await {
            Ok(ch) => return Ok(NodeAgentClient::new(ch)),
            Err(e) if Instant::now() > deadline => return Err(e.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test]
#[ignore = "privileged: netns, QEMU, qemu-img, dnsmasq (root)"]
async fn agent_imports_overlays_networks_restarts_and_cleans_up() {
    assert!(is_root(), "run as root");
    let guest = guest_dir();
    let mut node = TestNode::new();
    let http = serve_file(guest.join("disk-stream.vmdk"));
    let port = free_port();
    node.start_agent(port, None);
    let mut c = connect(port, None).await.expect("agent serves");

    // Import: progress, then READY with a digest; a second call answers READY at once.
    let req = pb::PrepareDiskRequest {
        disk_uid: "0b1c2d3e-0000-4000-8000-000000000001".into(),
        namespace: "ns".into(),
        name: "web-root".into(),
        source: Some(pb::DiskSource {
            kind: Some(pb::disk_source::Kind::HttpUrl(format!(
                "http://{HOST_IP}:{http}/sample-guest-stream.vmdk"
            ))),
        }),
        format: "vmdk".into(),
        ..Default::default()
    };
    let started = Instant::now();
    let mut stream = c
        .prepare_disk(req.clone())
        .await
        .expect("prepare")
        .into_inner();
    let mut msgs = Vec::new();
    while let Some(m) = stream.message().await.expect("progress") {
        msgs.push(m);
    }
    let last = msgs.last().expect("messages").clone();
    assert_eq!(
        last.phase,
        pb::disk_progress::Phase::Ready as i32,
        "import ended with {last:?}"
    );
    assert!(
        last.digest.starts_with("sha256:") && last.digest.len() == 71,
        "{last:?}"
    );
    assert!(last.virtual_bytes >= 100 << 20, "{last:?}");
    eprintln!(
        "imported in {:?} ({} progress messages)",
        started.elapsed(),
        msgs.len()
    );
    let again: Vec<_> = {
        let mut s = c
            .prepare_disk(req.clone())
            .await
            .expect("prepare")
            .into_inner();
        let mut v = Vec::new();
        while let Some(m) = s.message().await.expect("progress") {
            v.push(m);
        }
        v
    };
    assert_eq!(again.len(), 1, "an imported disk answers READY at once");
    assert_eq!(again[0].digest, last.digest);

    // Overlay: created once, found the second time.
    let ov = pb::EnsureOverlayRequest {
        vm_uid: "app-uid/web".into(),
        disk_name: "root".into(),
        base_digest: last.digest.clone(),
        virtual_bytes: last.virtual_bytes,
    };
    let a = c
        .ensure_overlay(ov.clone())
        .await
        .expect("overlay")
        .into_inner();
    let b = c
        .ensure_overlay(ov.clone())
        .await
        .expect("overlay again")
        .into_inner();
    assert_eq!(a.path, b.path);
    assert!(Path::new(&a.path).is_file(), "{}", a.path);
    let missing = c
        .ensure_overlay(pb::EnsureOverlayRequest {
            base_digest: format!("sha256:{}", "0".repeat(64)),
            disk_name: "other".into(),
            ..ov.clone()
        })
        .await
        .expect_err("no such base");
    assert_eq!(missing.code(), tonic::Code::FailedPrecondition);

    // Network with one VM port: bridge, tap enslaved to it, dnsmasq.
    let tap = hvx_api::launch::tap_name("app-uid/web", "ethernet0");
    let net = pb::EnsureNetworkRequest {
        network_uid: "net-uid".into(),
        namespace: "ns".into(),
        name: "app-net".into(),
        vni: VNI,
        subnets: vec![pb::Subnet {
            cidr: "10.77.0.0/24".into(),
            gateway: "10.77.0.1".into(),
            dhcp: true,
            range_start: "10.77.0.100".into(),
            range_end: "10.77.0.150".into(),
            lease_seconds: 600,
        }],
        firewall_default_allow: true,
        remote_vteps: vec!["10.250.77.2".into()],
        local_ports: vec![pb::LocalPort {
            vm: "web".into(),
            nic: "ethernet0".into(),
            mac: "00:50:56:a1:00:01".into(),
            tap: tap.clone(),
            ip: String::new(),
        }],
        ..Default::default()
    };
    let state = c
        .ensure_network(net.clone())
        .await
        .expect("network")
        .into_inner();
    assert_eq!(state.bridge, format!("hvb{VNI}"));
    let master = sh(&["ip", "-n", &node.netns, "-o", "link", "show", &tap]);
    assert!(master.contains(&format!("master hvb{VNI}")), "{master}");
    c.ensure_network(net.clone()).await.expect("idempotent");
    // A clone of the network with the same subnet shares this node: its own bridge
    // and gateway namespace; the node namespace holds no address of the subnet.
    let clone = pb::EnsureNetworkRequest {
        network_uid: "net-uid-2".into(),
        name: "clone-net".into(),
        vni: VNI + 1,
        local_ports: vec![],
        ..net.clone()
    };
    c.ensure_network(clone)
        .await
        .expect("same subnet on one node");
    assert!(node.links().contains(&format!("hvb{}", VNI + 1)));
    let agent_pid = node.agent.as_ref().expect("agent").id();
    for vni in [VNI, VNI + 1] {
        let gw = in_gateway_ns(
            agent_pid,
            vni,
            &["ip", "-4", "-o", "addr", "show", "dev", "gw0"],
        );
        assert!(gw.contains("10.77.0.1/24"), "vni {vni}: {gw}");
    }
    let node_addrs = sh(&["ip", "-n", &node.netns, "-4", "-o", "addr", "show"]);
    assert!(!node_addrs.contains("10.77.0."), "{node_addrs}");
    c.delete_network(pb::DeleteNetworkRequest {
        network_uid: "net-uid-2".into(),
        vni: VNI + 1,
        force: false,
    })
    .await
    .expect("delete the clone");
    assert!(!node.links().contains(&format!("hvb{}", VNI + 1)));
    assert!(!Path::new(&format!("/run/netns/hvx-n-{}", VNI + 1)).exists());
    let caps = c
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .expect("caps")
        .into_inner();
    assert_eq!(caps.vtep_ip, NODE_IP);
    assert_eq!(caps.base_digests, vec![last.digest.clone()]);

    // Restart: the bridge deleted behind the agent's back comes back from its state.
    node.stop_agent();
    sh(&["ip", "-n", &node.netns, "link", "del", &format!("hvb{VNI}")]);
    node.start_agent(port, None);
    let mut c = connect(port, None).await.expect("agent serves again");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.links().contains(&format!("hvb{VNI}")) {
        assert!(
            Instant::now() < deadline,
            "network not restored:\n{}",
            node.links()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let master = sh(&["ip", "-n", &node.netns, "-o", "link", "show", &tap]);
    assert!(
        master.contains(&format!("master hvb{VNI}")),
        "tap re-attached: {master}"
    );

    // Cleanup: overlay, network (bridge, VXLAN and tap go), base.
    c.delete_overlay(pb::DeleteOverlayRequest {
        vm_uid: "app-uid/web".into(),
        disk_name: "root".into(),
    })
    .await
    .expect("delete overlay");
    assert!(!Path::new(&a.path).exists());
    c.delete_network(pb::DeleteNetworkRequest {
        network_uid: "net-uid".into(),
        vni: VNI,
        force: false,
    })
    .await
    .expect("delete network");
    let links = node.links();
    for gone in [
        format!("hvb{VNI}"),
        format!("hvv{VNI}"),
        format!("hvg{VNI}"),
        tap.clone(),
    ] {
        assert!(!links.contains(&gone), "{gone} left:\n{links}");
    }
    assert!(
        !Path::new(&format!("/run/netns/hvx-n-{VNI}")).exists(),
        "gateway namespace left"
    );
    let released = c
        .release_disk(pb::ReleaseDiskRequest {
            disk_uid: req.disk_uid.clone(),
        })
        .await
        .expect("release")
        .into_inner();
    assert!(released.base_removed);
    let files: Vec<_> = walk(node.root.path())
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains("/overlay/"))
        // The socket launchers verify their specs through lives as long as the agent.
        .filter(|p| !p.ends_with("seal.sock"))
        .collect();
    assert!(files.is_empty(), "files left: {files:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CA, an agent server certificate (SAN hvx-agent) and the operator's client-only
/// certificate (SAN hvx-operator), as files an agent started with --tls-dir reads.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=hvx-ca",
        ],
    );
    for (name, cn, ext) in [
        (
            "server",
            "hvx-agent",
            "subjectAltName=DNS:hvx-agent\nextendedKeyUsage=serverAuth",
        ),
        (
            "client",
            "hvx-operator",
            "subjectAltName=DNS:hvx-operator\nextendedKeyUsage=clientAuth",
        ),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("ext");
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                &format!("{name}.crt"),
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
    let tls = dir.join("agent");
    std::fs::create_dir_all(&tls).expect("mkdir");
    std::fs::copy(dir.join("ca.crt"), tls.join("ca.crt")).expect("copy");
    std::fs::copy(dir.join("server.crt"), tls.join("tls.crt")).expect("copy");
    std::fs::copy(dir.join("server.key"), tls.join("tls.key")).expect("copy");
}

#[tokio::test]
#[ignore = "privileged: netns (root)"]
async fn agent_requires_a_client_certificate_signed_by_its_ca() {
    assert!(is_root(), "run as root");
    let certs = tempfile::tempdir().expect("tempdir");
    make_certs(certs.path());
    let mut node = TestNode::new();
    let port = free_port();
    node.start_agent(port, Some(&certs.path().join("agent")));
    let read = |f: &str| std::fs::read(certs.path().join(f)).expect("read cert");
    let ca = Certificate::from_pem(read("ca.crt"));

    let with_cert = ClientTlsConfig::new()
        .domain_name("hvx-agent")
        .ca_certificate(ca.clone())
        .identity(Identity::from_pem(read("client.crt"), read("client.key")));
    let mut ok = connect(port, Some(with_cert))
        .await
        .expect("mutual TLS connects");
    let caps = ok
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .expect("served over mutual TLS")
        .into_inner();
    assert_eq!(caps.node_name, "test-node");

    let without = ClientTlsConfig::new()
        .domain_name("hvx-agent")
        .ca_certificate(ca);
    let refused = match connect(port, Some(without)).await {
        Err(_) => true,
        Ok(mut c) => c
            .get_capabilities(pb::GetCapabilitiesRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    drop(node);
}

/// Imports the test guest's VMDK through `c`; returns its digest and size.
async fn import_guest(c: &mut NodeAgentClient<Channel>, http: u16) -> (String, u64) {
    let req = pb::PrepareDiskRequest {
        disk_uid: "0b1c2d3e-0000-4000-8000-000000000002".into(),
        namespace: "ns".into(),
        name: "db-root".into(),
        source: Some(pb::DiskSource {
            kind: Some(pb::disk_source::Kind::HttpUrl(format!(
                "http://{HOST_IP}:{http}/sample-guest-stream.vmdk"
            ))),
        }),
        format: "vmdk".into(),
        ..Default::default()
    };
    let mut stream = c.prepare_disk(req).await.expect("prepare").into_inner();
    let mut last = None;
    while let Some(m) = stream.message().await.expect("progress") {
        last = Some(m);
    }
    let last = last.expect("import result");
    assert_eq!(
        last.phase,
        pb::disk_progress::Phase::Ready as i32,
        "{last:?}"
    );
    (last.digest, last.virtual_bytes)
}

/// What the operator does for a move: the export's messages, header stamped with the
/// move id, into the import; `cut` drops everything after that many messages.
async fn relay(
    from: &mut NodeAgentClient<Channel>,
    to: &mut NodeAgentClient<Channel>,
    vm_uid: &str,
    move_id: &str,
    cut: Option<usize>,
) -> Result<pb::OverlayInfo, tonic::Status> {
    let mut export = from
        .export_overlay(pb::ExportOverlayRequest {
            vm_uid: vm_uid.into(),
            disk_name: "root".into(),
        })
        .await?
        .into_inner();
    let mut msgs = Vec::new();
    while let Some(mut m) = export.message().await? {
        if let Some(pb::overlay_chunk::Part::Header(h)) = m.part.as_mut() {
            h.move_id = move_id.into();
        }
        msgs.push(m);
    }
    if let Some(n) = cut {
        msgs.truncate(n);
    }
    Ok(to
        .import_overlay(tokio_stream::iter(msgs))
        .await?
        .into_inner())
}

#[tokio::test]
#[ignore = "privileged: netns, qemu-img (root)"]
async fn agents_move_a_stopped_vms_overlay_between_nodes() {
    assert!(is_root(), "run as root");
    let guest = guest_dir();
    let mut node = TestNode::new();
    let http = serve_file(guest.join("disk-stream.vmdk"));
    let (p1, p2) = (free_port(), free_port() + 2);
    node.start_agent(p1, None);
    let root2 = tempfile::tempdir().expect("tempdir");
    let mut second = node.spawn_agent("test-node-2", p2, root2.path(), None);
    let mut a = connect(p1, None).await.expect("agent 1");
    let mut b = connect(p2, None).await.expect("agent 2");
    let (digest, size) = import_guest(&mut a, http).await;
    let vm = "app-uid/db";

    // The target has no base yet: a precondition, and nothing is written there.
    a.ensure_overlay(pb::EnsureOverlayRequest {
        vm_uid: vm.into(),
        disk_name: "root".into(),
        base_digest: digest.clone(),
        virtual_bytes: size,
    })
    .await
    .expect("overlay");
    let e = relay(&mut a, &mut b, vm, "m1", None)
        .await
        .expect_err("no base on the target");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("PrepareDisk first"), "{e:?}");
    assert_eq!(import_guest(&mut b, http).await.0, digest);

    // Data written by the VM on node 1 (a few MiB past the base, and over it).
    let src = a
        .ensure_overlay(pb::EnsureOverlayRequest {
            vm_uid: vm.into(),
            disk_name: "root".into(),
            base_digest: digest.clone(),
            virtual_bytes: size,
        })
        .await
        .expect("overlay")
        .into_inner();
    sh(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x5a 1M 3M",
        &src.path,
    ]);
    sh(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x33 90M 64k",
        &src.path,
    ]);

    // A stream cut short installs nothing.
    let e = relay(&mut a, &mut b, vm, "m1", Some(2))
        .await
        .expect_err("cut short");
    assert!(e.message().contains("before its trailer"), "{e:?}");
    let store2 = root2.path().join("lib/nodes/test-node-2/store");
    let staging: Vec<_> = walk(&store2.join("tmp"));
    assert!(staging.is_empty(), "staging left: {staging:?}");

    // The whole chain moves; node 2's copy reads exactly like node 1's and refers only
    // to node 2's files.
    let moved = relay(&mut a, &mut b, vm, "m1", None).await.expect("move");
    assert_ne!(moved.path, src.path);
    let same = sh(&[
        "qemu-img",
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        &src.path,
        &moved.path,
    ]);
    assert!(same.contains("identical"), "{same}");
    let chain = sh(&["qemu-img", "info", "--backing-chain", &moved.path]);
    assert!(
        !chain.contains(&node.root.path().display().to_string()),
        "node 2's chain refers to node 1: {chain}"
    );
    // Again with the same move id (an operator that restarted): answered at once, and
    // the installed copy (maybe in use by now) is left alone.
    sh(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x77 8M 64k",
        &moved.path,
    ]);
    let again = relay(&mut a, &mut b, vm, "m1", None)
        .await
        .expect("same move");
    assert_eq!(again.path, moved.path);
    let kept = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x77 8M 64k", &moved.path])
        .output()
        .expect("qemu-io");
    assert!(
        String::from_utf8_lossy(&kept.stdout).contains("read 65536/65536"),
        "the second delivery of move m1 overwrote the disk"
    );
    // A missing disk cannot be exported.
    let e = relay(&mut a, &mut b, "app-uid/none", "m2", None)
        .await
        .expect_err("no such overlay");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    // The old copy is deleted as the operator does once the VM runs on node 2.
    for c in [&mut a, &mut b] {
        c.delete_overlay(pb::DeleteOverlayRequest {
            vm_uid: vm.into(),
            disk_name: "root".into(),
        })
        .await
        .expect("delete overlay");
        c.release_disk(pb::ReleaseDiskRequest {
            disk_uid: "0b1c2d3e-0000-4000-8000-000000000002".into(),
        })
        .await
        .expect("release");
    }
    let _ = second.kill();
    let _ = second.wait();
    let left: Vec<_> = walk(&store2)
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains("/overlay/"))
        .collect();
    assert!(left.is_empty(), "files left on node 2: {left:?}");
}

/// A process seen in /proc: pid, parent, command line.
#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    ppid: u32,
    args: String,
}

fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let (Ok(stat), Ok(cmd)) = (
            std::fs::read_to_string(e.path().join("stat")),
            std::fs::read(e.path().join("cmdline")),
        ) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.first() == Some(&"Z") {
            continue;
        }
        out.push(Proc {
            pid,
            ppid: f.get(1).and_then(|p| p.parse().ok()).unwrap_or(0),
            args: String::from_utf8_lossy(&cmd).replace('\0', " "),
        });
    }
    out
}

/// Waits up to `secs` for a child of `parent` whose command line has all of `words`.
fn wait_child(parent: u32, words: &[&str], secs: u64) -> hvx_child::ProcId {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(p) = processes()
            .into_iter()
            .find(|p| p.ppid == parent && words.iter().all(|w| p.args.contains(w)))
            && let Some(id) = hvx_child::ProcId::of(p.pid)
        {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "no child of {parent} with {words:?} within {secs}s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_gone(id: &hvx_child::ProcId, what: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while id.is_alive() {
        if Instant::now() > deadline {
            let _ = hvx_child::kill_and_wait(id, Duration::from_secs(2));
            panic!("{what} (pid {}) survived its agent", id.pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wrappers in front of QEMU and qemu-img for the agent: the probe guest never
/// prints (as on hosts where KVM hangs in the kernel's decompressor), and
/// conversions are rate-limited, so each is surely running when the agent is killed.
fn slow_tools(dir: &Path) -> Vec<(String, String)> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    // Conversions are slow while this file exists.
    std::fs::write(dir.join("slow"), "").expect("slow");
    let qemu = which("qemu-system-x86_64");
    let img = which("qemu-img");
    for (name, body) in [
        (
            "qemu-system-x86_64",
            format!(
                "#!/bin/bash\nargs=()\nfor a in \"$@\"; do case \"$a\" in kvm) a=tcg;; host) a=qemu64;; esac; args+=(\"$a\"); done\nexec {qemu} \"${{args[@]}}\"\n"
            ),
        ),
        (
            "qemu-img",
            format!(
                "#!/bin/bash\nif [ \"$1\" = convert ] && [ -e {slow} ]; then shift; exec {img} convert -r 256K \"$@\"; fi\nexec {img} \"$@\"\n",
                slow = dir.join("slow").display()
            ),
        ),
    ] {
        let p = bin.join(name);
        std::fs::write(&p, body).expect("wrapper");
        sh(&["chmod", "+x", &p.display().to_string()]);
    }
    // A multiboot "kernel" that spins without output: the probe waits its full
    // 10 s for a line that never comes, its vCPU busy all along.
    let spin = dir.join("spin.mb");
    let (magic, flags) = (0x1BAD_B002u32, 0x0001_0000u32);
    let load = 0x0010_0000u32;
    let mut img_bytes = Vec::new();
    for v in [
        magic,
        flags,
        0u32.wrapping_sub(magic.wrapping_add(flags)),
        load,
        load,
        0,
        0,
        load + 32,
    ] {
        img_bytes.extend_from_slice(&v.to_le_bytes());
    }
    img_bytes.extend_from_slice(&[0xEB, 0xFE]);
    img_bytes.resize(4096, 0);
    std::fs::write(&spin, img_bytes).expect("spin kernel");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    vec![
        ("PATH".into(), path),
        ("HVX_PROBE_KERNEL".into(), spin.display().to_string()),
    ]
}

fn which(tool: &str) -> String {
    sh(&["sh", "-c", &format!("command -v {tool}")])
        .trim()
        .to_string()
}

/// The dnsmasq processes serving `conf`.
fn dnsmasqs(conf: &Path) -> Vec<Proc> {
    let conf = conf.display().to_string();
    processes()
        .into_iter()
        .filter(|p| p.args.contains("dnsmasq") && p.args.contains(&conf))
        .collect()
}

/// Whether the dnsmasq of `conf` answers on `ip` (any reply counts), asked from
/// inside the network namespace it serves (the network's gateway namespace, whose
/// name lives in the agent's mount namespace; this one may have died with it).
fn dns_answers(conf: &Path, ip: &str) -> bool {
    let Some(dnsmasq) = dnsmasqs(conf).first().map(|p| p.pid) else {
        return false;
    };
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(1)\n\
         q=b'\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x03web\\x00\\x00\\x01\\x00\\x01'\n\
         s.sendto(q,('{ip}',53))\ntry:\n  d=s.recvfrom(512)[0]\n  sys.exit(0 if d[:2]==b'\\x12\\x34' else 1)\n\
         except Exception:\n  sys.exit(1)\n"
    );
    Command::new("nsenter")
        .arg(format!("--net=/proc/{dnsmasq}/ns/net"))
        .args(["python3", "-c", &script])
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `argv` in network `vni`'s gateway namespace, named in the mount namespace
/// of the agent `agent` (as in a pod: the agent container's own `/run/netns`).
fn in_gateway_ns(agent: u32, vni: u32, argv: &[&str]) -> String {
    let ns = format!("hvx-n-{vni}");
    let mnt = format!("--mount=/proc/{agent}/ns/mnt");
    let mut args = vec!["nsenter", &mnt, "--", "ip", "netns", "exec", &ns];
    args.extend_from_slice(argv);
    sh(&args)
}

/// SIGKILLs the agent (no clean-up code of it runs) and returns its pid.
fn kill_agent(node: &mut TestNode) -> u32 {
    let mut c = node.agent.take().expect("agent runs");
    let pid = c.id();
    c.kill().expect("SIGKILL the agent");
    let _ = c.wait();
    pid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: netns, QEMU, qemu-img, dnsmasq (root)"]
async fn agent_killed_mid_work_leaves_no_process_and_dns_comes_back() {
    assert!(is_root(), "run as root");
    assert!(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        "the accelerator probe runs QEMU only where /dev/kvm opens; this host has none"
    );
    let guest = guest_dir();
    let mut node = TestNode::new();
    node.env = slow_tools(node.root.path());
    let paths = hvx_api::node::NodePaths::new(
        &node.root.path().join("lib"),
        &node.root.path().join("run"),
        "test-node",
    );

    // A leftover a previous agent recorded (its owner is dead): the next start kills it.
    let records = paths.agent_state().join("children");
    std::fs::create_dir_all(&records).expect("mkdir");
    let mut cmd = Command::new("sleep");
    cmd.arg("300");
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut leftover = cmd.spawn().expect("sleep");
    let mut dead = Command::new("true").spawn().expect("true");
    let _ = dead.wait();
    let dead_id = hvx_child::ProcId {
        pid: dead.id(),
        start_time: 1,
        boot_id: String::new(),
    };
    let leftover_id = hvx_child::ProcId::of(leftover.id()).expect("alive");
    std::fs::write(
        records.join(format!("{}.json", leftover.id())),
        serde_json::to_vec(&hvx_child::ProcRecord {
            process: leftover_id.clone(),
            what: "accelerator probe".into(),
            owner: hvx_child::Owner {
                kind: "hvx-node-agent".into(),
                process: dead_id,
            },
        })
        .expect("json"),
    )
    .expect("record");

    // 1. Killed during its accelerator probe: the probe's QEMU dies with it.
    let port = free_port();
    node.start_agent(port, None);
    let agent = node.agent.as_ref().expect("agent").id();
    let probe = wait_child(agent, &["qemu-system", "spin.mb"], 20);
    assert_gone(
        &leftover_id,
        "the recorded leftover of an earlier agent",
        10,
    );
    let _ = leftover.wait();
    assert!(
        !records.join(format!("{}.json", leftover_id.pid)).exists(),
        "stale record kept"
    );
    assert!(
        records.join(format!("{}.json", probe.pid)).exists(),
        "the probe is not recorded"
    );
    kill_agent(&mut node);
    assert_gone(&probe, "the accelerator probe's QEMU", 3);

    // 2. Killed with a network up and an import converting: qemu-img dies, dnsmasq
    // (meant to outlive the agent process) keeps serving.
    node.start_agent(port, None);
    let agent = node.agent.as_ref().expect("agent").id();
    let mut c = connect(port, None).await.expect("agent serves");
    let net = pb::EnsureNetworkRequest {
        network_uid: "net-uid".into(),
        namespace: "ns".into(),
        name: "app-net".into(),
        vni: VNI,
        subnets: vec![pb::Subnet {
            cidr: "10.77.0.0/24".into(),
            gateway: "10.77.0.1".into(),
            dhcp: true,
            range_start: "10.77.0.100".into(),
            range_end: "10.77.0.150".into(),
            lease_seconds: 600,
        }],
        firewall_default_allow: true,
        ..Default::default()
    };
    c.ensure_network(net.clone()).await.expect("network");
    let conf = paths
        .overlay_state()
        .join(VNI.to_string())
        .join("dnsmasq.conf");
    let first = dnsmasqs(&conf);
    assert_eq!(first.len(), 1, "{first:?}");
    let dns = hvx_child::ProcId::of(first[0].pid).expect("dnsmasq");
    assert!(dns_answers(&conf, "10.77.0.1"), "dnsmasq does not answer");
    let http = serve_file(guest.join("disk-stream.vmdk"));
    let mut importing = c.clone();
    let import = tokio::spawn(async move {
        let req = pb::PrepareDiskRequest {
            disk_uid: "0b1c2d3e-0000-4000-8000-000000000003".into(),
            namespace: "ns".into(),
            name: "slow-root".into(),
            source: Some(pb::DiskSource {
                kind: Some(pb::disk_source::Kind::HttpUrl(format!(
                    "http://{HOST_IP}:{http}/sample-guest-stream.vmdk"
                ))),
            }),
            format: "vmdk".into(),
            ..Default::default()
        };
        let mut s = importing.prepare_disk(req).await?.into_inner();
        while s.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    });
    let convert = wait_child(agent, &["qemu-img", "convert"], 60);
    let probe = processes()
        .into_iter()
        .find(|p| p.ppid == agent && p.args.contains("spin.mb"))
        .and_then(|p| hvx_child::ProcId::of(p.pid));
    kill_agent(&mut node);
    assert_gone(&convert, "qemu-img convert", 3);
    if let Some(p) = &probe {
        assert_gone(p, "the second accelerator probe's QEMU", 3);
    }
    assert!(
        matches!(import.await, Ok(Err(_))),
        "the import outlived its agent"
    );
    assert!(dns.is_alive(), "dnsmasq died with the agent process");
    assert!(
        dns_answers(&conf, "10.77.0.1"),
        "DNS stopped with the agent process"
    );

    // 3. The next agent adopts that very dnsmasq and leaves one set of processes.
    node.start_agent(port, None);
    let agent = node.agent.as_ref().expect("agent").id();
    let c = connect(port, None).await.expect("agent serves again");
    let deadline = Instant::now() + Duration::from_secs(20);
    let owner = loop {
        let rec: Option<hvx_child::ProcRecord> =
            std::fs::read(conf.with_file_name("dnsmasq.proc.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(r) = rec.filter(|r| r.owner.process.pid == agent) {
            break r;
        }
        assert!(Instant::now() < deadline, "dnsmasq not adopted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(owner.process, dns, "dnsmasq replaced instead of adopted");
    assert_eq!(dnsmasqs(&conf).len(), 1, "{:?}", dnsmasqs(&conf));
    let root = node.root.path().display().to_string();
    let strays: Vec<Proc> = processes()
        .into_iter()
        .filter(|p| {
            (p.args.contains("qemu-img") && p.args.contains(&root))
                || (p.args.contains("spin.mb") && p.ppid != agent)
        })
        .collect();
    assert!(strays.is_empty(), "left over: {strays:?}");
    // The import the killed agent left half done succeeds when asked again.
    std::fs::remove_file(node.root.path().join("slow")).expect("fast conversions");
    let retried = c
        .clone()
        .prepare_disk(pb::PrepareDiskRequest {
            disk_uid: "0b1c2d3e-0000-4000-8000-000000000003".into(),
            namespace: "ns".into(),
            name: "slow-root".into(),
            source: Some(pb::DiskSource {
                kind: Some(pb::disk_source::Kind::HttpUrl(format!(
                    "http://{HOST_IP}:{http}/sample-guest-stream.vmdk"
                ))),
            }),
            format: "vmdk".into(),
            ..Default::default()
        })
        .await
        .expect("prepare again");
    let mut stream = retried.into_inner();
    let mut last = None;
    while let Some(m) = stream.message().await.expect("progress") {
        last = Some(m);
    }
    let last = last.expect("import result");
    assert_eq!(
        last.phase,
        pb::disk_progress::Phase::Ready as i32,
        "the interrupted import cannot be redone: {last:?}"
    );

    // 4. In a pod, containerd kills dnsmasq with the agent container: the next agent
    // starts it again before it serves anything else (docs: within seconds).
    kill_agent(&mut node);
    assert!(hvx_child::kill_and_wait(&dns, Duration::from_secs(5)));
    assert!(!dns_answers(&conf, "10.77.0.1"));
    let started = Instant::now();
    node.start_agent(port, None);
    while !dns_answers(&conf, "10.77.0.1") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "DNS not back within 10 s of the agent's start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("DNS back {:?} after the agent started", started.elapsed());
    assert_eq!(dnsmasqs(&conf).len(), 1, "{:?}", dnsmasqs(&conf));
    node.stop_agent();
}

#[tokio::test]
#[ignore = "privileged: netns, qemu-img (root)"]
async fn agent_makes_a_blank_disk_of_the_declared_size() {
    assert!(is_root(), "run as root");
    let mut node = TestNode::new();
    let port = free_port();
    node.start_agent(port, None);
    let mut c = connect(port, None).await.expect("agent serves");
    let size: u64 = 2 << 30;
    let req = pb::PrepareDiskRequest {
        disk_uid: "0b1c2d3e-0000-4000-8000-0000000000b1".into(),
        namespace: "ns".into(),
        name: "app-data".into(),
        source: Some(pb::DiskSource {
            kind: Some(pb::disk_source::Kind::BlankBytes(size)),
        }),
        format: "auto".into(),
        ..Default::default()
    };
    let mut stream = c
        .prepare_disk(req.clone())
        .await
        .expect("prepare")
        .into_inner();
    let mut last = None;
    while let Some(m) = stream.message().await.expect("progress") {
        last = Some(m);
    }
    let last = last.expect("result");
    assert_eq!(
        last.phase,
        pb::disk_progress::Phase::Ready as i32,
        "{last:?}"
    );
    assert_eq!(last.virtual_bytes, size, "{last:?}");
    assert_eq!(
        last.digest,
        format!("sha256:{}", hvx_storage::blank::BLANK_DIGEST)
    );
    let ov = c
        .ensure_overlay(pb::EnsureOverlayRequest {
            vm_uid: "app-uid/db".into(),
            disk_name: "data".into(),
            base_digest: last.digest.clone(),
            virtual_bytes: last.virtual_bytes,
        })
        .await
        .expect("overlay")
        .into_inner();
    assert_eq!(ov.virtual_bytes, size);
    let info = sh(&["qemu-img", "info", "--output=json", "-U", &ov.path]);
    assert!(
        info.contains(&format!("\"virtual-size\": {size}")),
        "{info}"
    );
    let read = sh(&[
        "qemu-io",
        "-r",
        "-f",
        "qcow2",
        "-c",
        "read -P 0 0 1M",
        "-c",
        &format!("read -P 0 {} 1M", size - (1 << 20)),
        &ov.path,
    ]);
    assert!(!read.contains("verification failed"), "{read}");

    // Without a size there is nothing to make: refused, not retried as a precondition.
    let e = c
        .prepare_disk(pb::PrepareDiskRequest {
            disk_uid: "0b1c2d3e-0000-4000-8000-0000000000b2".into(),
            source: Some(pb::DiskSource {
                kind: Some(pb::disk_source::Kind::BlankBytes(0)),
            }),
            ..req
        })
        .await
        .expect_err("no size");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    drop(node);
}

/// Imports `member` of the OVA at `url` through `c`; returns the final message.
async fn import_ova_member(
    c: &mut NodeAgentClient<Channel>,
    uid: &str,
    url: &str,
    member: &str,
) -> pb::DiskProgress {
    let req = pb::PrepareDiskRequest {
        disk_uid: uid.into(),
        namespace: "ns".into(),
        name: format!("ova-{}", &uid[uid.len() - 2..]),
        source: Some(pb::DiskSource {
            kind: Some(pb::disk_source::Kind::Ova(pb::OvaMember {
                url: url.into(),
                member: member.into(),
            })),
        }),
        format: "auto".into(),
        ..Default::default()
    };
    let mut stream = c.prepare_disk(req).await.expect("prepare").into_inner();
    let mut last = None;
    while let Some(m) = stream.message().await.expect("progress") {
        last = Some(m);
    }
    last.expect("import result")
}

#[tokio::test]
#[ignore = "privileged: netns, qemu-img (root)"]
async fn agent_imports_a_member_of_an_ova_served_over_http() {
    assert!(is_root(), "run as root");
    let guest = guest_dir();
    let vmdk = guest.join("disk-stream.vmdk");
    let work = tempfile::tempdir().expect("tmp");
    let ova = work.path().join("app.ova");
    hvx_storage::ova::write_ova(
        &ova,
        "app",
        "<Envelope/>",
        &[
            ("db-disk1.vmdk".into(), vmdk.clone()),
            ("web-disk1.vmdk".into(), vmdk.clone()),
        ],
    )
    .expect("write ova");
    // The same archive whose manifest lists a wrong SHA256 for the disk.
    let tampered = work.path().join("tampered.ova");
    {
        let p = tampered.as_path();
        let mut out = std::fs::File::create(p).expect("create");
        let mf = format!("SHA256(web-disk1.vmdk)= {}\n", "0".repeat(64));
        hvx_storage::tar::append_file(&mut out, "app.ovf", &mut &b"<Envelope/>"[..], 11, p)
            .expect("ovf");
        hvx_storage::tar::append_file(&mut out, "app.mf", &mut mf.as_bytes(), mf.len() as u64, p)
            .expect("mf");
        let len = std::fs::metadata(&vmdk).expect("vmdk").len();
        let mut disk = std::fs::File::open(&vmdk).expect("vmdk");
        hvx_storage::tar::append_file(&mut out, "web-disk1.vmdk", &mut disk, len, p).expect("disk");
        out.write_all(&[0u8; 1024]).expect("end");
    }
    let mut node = TestNode::new();
    let direct = serve_file(vmdk.clone());
    let served = serve_file(ova.clone());
    let served_tampered = serve_file(tampered.clone());
    let port = free_port();
    node.start_agent(port, None);
    let mut c = connect(port, None).await.expect("agent serves");

    let url = format!("http://{HOST_IP}:{served}/app.ova");
    let last = import_ova_member(
        &mut c,
        "0b1c2d3e-0000-4000-8000-0000000000c1",
        &url,
        "web-disk1.vmdk",
    )
    .await;
    assert_eq!(
        last.phase,
        pb::disk_progress::Phase::Ready as i32,
        "{last:?}"
    );
    // The member's bytes are the VMDK's: the same base as importing it directly.
    let (digest, virtual_bytes) = import_guest(&mut c, direct).await;
    assert_eq!(last.digest, digest);
    assert_eq!(last.virtual_bytes, virtual_bytes);

    let last = import_ova_member(
        &mut c,
        "0b1c2d3e-0000-4000-8000-0000000000c2",
        &url,
        "nope.vmdk",
    )
    .await;
    assert_eq!(
        last.phase,
        pb::disk_progress::Phase::Failed as i32,
        "{last:?}"
    );
    assert!(
        last.message
            .contains("no regular file member \"nope.vmdk\""),
        "{last:?}"
    );
    assert!(
        last.message.contains(&url),
        "names the OVA by its URL: {last:?}"
    );

    let bad_url = format!("http://{HOST_IP}:{served_tampered}/tampered.ova");
    let last = import_ova_member(
        &mut c,
        "0b1c2d3e-0000-4000-8000-0000000000c3",
        &bad_url,
        "web-disk1.vmdk",
    )
    .await;
    assert_eq!(
        last.phase,
        pb::disk_progress::Phase::Failed as i32,
        "{last:?}"
    );
    assert!(last.message.contains("manifest"), "{last:?}");

    // A traversal name never reaches the store: refused as invalid, not retried.
    let e = c
        .prepare_disk(pb::PrepareDiskRequest {
            disk_uid: "0b1c2d3e-0000-4000-8000-0000000000c4".into(),
            source: Some(pb::DiskSource {
                kind: Some(pb::disk_source::Kind::Ova(pb::OvaMember {
                    url,
                    member: "../web-disk1.vmdk".into(),
                })),
            }),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    drop(node);
}
