//! Against a real API server (tier 3): the imported manifests pass the CRDs' schema and
//! CEL rules as written, `--upload` creates the objects and streams every disk to the
//! upload endpoint, `migrate` creates a VmMigration and `snapshot` requests snapshots.
//!
//! Needs KUBECONFIG (e.g. `source e2e/harness/env.sh` after `make cluster-up`). Uses a
//! namespace of its own, deleted on drop; installs the hvx CRDs only when missing and
//! never deletes them (other tests share them).

use hvx_api::{OverlayDisk, VmApplication, VmMigration};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_kubectl-hvx");

/// Deletes the test namespace even when the test fails.
struct NamespaceGuard(String);

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .args([
                "delete",
                "namespace",
                &self.0,
                "--wait=false",
                "--ignore-not-found",
            ])
            .output();
    }
}

async fn ensure_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in hvx_api::all_crds() {
        let name = crd.name_any();
        if api.get_opt(&name).await.expect("get crd").is_none() {
            api.create(&PostParams::default(), &crd)
                .await
                .expect("create crd");
        }
        for _ in 0..60 {
            let c = api.get(&name).await.expect("crd");
            let established = c
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn member(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    b.append(&h, data).expect("append");
}

/// The multi-VM fixture as an OVA with three small disks.
fn shop_ova(dir: &Path) -> (std::path::PathBuf, Vec<(String, Vec<u8>)>) {
    let ovf = std::fs::read(format!(
        "{}/../import/tests/fixtures/vapp-collection.ovf",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture");
    let disks: Vec<(String, Vec<u8>)> = ["shop-db-1.vmdk", "shop-db-2.vmdk", "shop-web-1.vmdk"]
        .iter()
        .enumerate()
        .map(|(i, n)| ((*n).to_owned(), vec![i as u8 + 1; 300_000 + i * 1000]))
        .collect();
    let hex = |d: &[u8]| -> String {
        Sha256::digest(d)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let mut mf = format!("SHA256(shop.ovf)= {}\n", hex(&ovf));
    for (n, d) in &disks {
        mf.push_str(&format!("SHA256({n})= {}\n", hex(d)));
    }
    let mut b = tar::Builder::new(Vec::new());
    member(&mut b, "shop.ovf", &ovf);
    member(&mut b, "shop.mf", mf.as_bytes());
    for (n, d) in &disks {
        member(&mut b, n, d);
    }
    let path = dir.join("shop.ova");
    std::fs::write(&path, b.into_inner().expect("tar")).expect("write");
    (path, disks)
}

/// Bytes received, per URL path.
type Store = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A loopback server speaking the upload protocol; stores bytes per URL path.
fn upload_server() -> (String, Store) {
    let store: Store = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}/v1alpha1", listener.local_addr().expect("addr"));
    let s = store.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or("").to_owned(),
            );
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let mut st = s.lock().expect("lock");
            let entry = match st.iter().position(|(p, _)| *p == path) {
                Some(i) => i,
                None => {
                    st.push((path.clone(), Vec::new()));
                    st.len() - 1
                }
            };
            if method == "PUT" {
                st[entry].1.extend_from_slice(&body);
            }
            let offset = st[entry].1.len();
            let mut out = stream;
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nUpload-Offset: {offset}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (base, store)
}

#[tokio::test]
#[ignore = "cluster: needs KUBECONFIG (make cluster-up)"]
async fn import_upload_migrate_snapshot_against_the_api_server() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("skipped: KUBECONFIG is not set (no cluster to test against)");
        return;
    }
    let client = Client::try_default().await.expect("kubeconfig");
    ensure_crds(&client).await;
    let ns = format!("hvx-import-test-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.clone());
    namespaces
        .create(&PostParams::default(), &n)
        .await
        .expect("namespace");
    let _guard = NamespaceGuard(ns.clone());

    let dir = tempfile::tempdir().expect("tempdir");
    let (ova, disks) = shop_ova(dir.path());
    let (base, store) = upload_server();
    let out = Command::new(BIN)
        .args([
            "import",
            ova.to_str().expect("utf8"),
            "-n",
            &ns,
            "--upload",
            "--upload-url",
            &base,
            // The admin kubeconfig holds a client certificate, which cannot be
            // forwarded: the endpoint takes a bearer token (this loopback one any).
            "--upload-token",
            "test-token",
        ])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("100%"), "progress reported: {stderr}");

    // The API server accepted every object (schema + CEL) as generated.
    let apps: Api<VmApplication> = Api::namespaced(client.clone(), &ns);
    let app = apps.get("shop").await.expect("VmApplication created");
    assert_eq!(app.spec.vms.len(), 2);
    assert_eq!(app.spec.vms[1].depends_on, Some(vec!["shop-db".to_owned()]));
    let odisks: Api<OverlayDisk> = Api::namespaced(client.clone(), &ns);
    let listed = odisks.list(&ListParams::default()).await.expect("list");
    assert_eq!(listed.items.len(), 3);

    // Every disk's bytes reached the endpoint, under its OverlayDisk's URL.
    let stored = store.lock().expect("lock").clone();
    for (file, bytes) in &disks {
        let disk = file.trim_end_matches(".vmdk");
        let path = format!("/v1alpha1/namespaces/{ns}/overlaydisks/{disk}/upload");
        let got = stored.iter().find(|(p, _)| *p == path).map(|(_, b)| b);
        assert_eq!(got, Some(bytes), "{path}");
    }

    // migrate finds the application from the VM name.
    let out = Command::new(BIN)
        .args(["migrate", "shop-web", "-n", &ns, "--to", "node-x"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let migs: Api<VmMigration> = Api::namespaced(client.clone(), &ns);
    let m = migs.list(&ListParams::default()).await.expect("list");
    assert_eq!(m.items.len(), 1);
    assert_eq!(m.items[0].spec.application, "shop");
    assert_eq!(m.items[0].spec.target_node.as_deref(), Some("node-x"));

    // snapshot requests one snapshot per disk, once.
    for _ in 0..2 {
        let out = Command::new(BIN)
            .args(["snapshot", "shop", "-n", &ns, "--name", "before-upgrade"])
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for d in odisks
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
    {
        let names: Vec<String> = d
            .spec
            .snapshots
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["before-upgrade"], "{}", d.name_any());
    }

    // Unknown VM: clear error, non-zero exit.
    let out = Command::new(BIN)
        .args(["migrate", "nope", "-n", &ns])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VmApplication in namespace"));
}

/// `import --source-url` of an OVA: the generated OverlayDisks (`ova` sources) pass
/// the CRD's schema and CEL rules (a server-side dry run: nothing is created).
#[tokio::test]
#[ignore = "cluster: needs KUBECONFIG (make cluster-up)"]
async fn ova_sources_from_source_url_pass_the_api_server() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("skipped: KUBECONFIG is not set (no cluster to test against)");
        return;
    }
    let client = Client::try_default().await.expect("kubeconfig");
    ensure_crds(&client).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (ova, disks) = shop_ova(dir.path());
    let out = Command::new(BIN)
        .args([
            "import",
            ova.to_str().expect("utf8"),
            "-n",
            "default",
            "--source-url",
            "http://files.example/shop.ova",
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    let odisks: Api<OverlayDisk> = Api::namespaced(client.clone(), "default");
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let mut seen = 0;
    for doc in serde_yaml::Deserializer::from_str(&yaml) {
        let value = serde_yaml::Value::deserialize(doc).expect("yaml doc");
        if value["kind"].as_str() != Some("OverlayDisk") {
            continue;
        }
        let disk: OverlayDisk = serde_yaml::from_value(value).expect("OverlayDisk");
        assert!(disk.spec.source.ova.is_some(), "{disk:?}");
        odisks
            .create(&dry_run, &disk)
            .await
            .unwrap_or_else(|e| panic!("{}: refused: {e}", disk.name_any()));
        seen += 1;
    }
    assert_eq!(seen, disks.len());
}

/// A stand-in launcher pod, labelled as the operator labels launcher pods (the shared
/// `hvx_api::labels`): `hvx-launcher console` is `cat`, so what is typed comes back
/// through the exec session (plus the remote tty's echo).
fn fake_launcher_pod(app: &str, vm: &str) -> k8s_openapi::api::core::v1::Pod {
    use hvx_api::labels::{LABEL_APP, LABEL_ROLE, LABEL_VM, ROLE_LAUNCHER};
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": format!("launcher-{vm}"),
                     "labels": {LABEL_ROLE: ROLE_LAUNCHER, LABEL_APP: app, LABEL_VM: vm}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "launcher",
                "image": "localhost/hvx-e2e-busybox:1",
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c",
                    "printf '#!/bin/sh\\nexec /bin/busybox cat\\n' > /bin/hvx-launcher && /bin/busybox chmod 755 /bin/hvx-launcher && exec sleep 3600"]
            }]
        }
    }))
    .expect("pod json")
}

#[tokio::test]
#[ignore = "cluster: needs KUBECONFIG (make cluster-up)"]
async fn console_attaches_to_the_launcher_container() {
    use k8s_openapi::api::core::v1::Pod;
    use std::process::Stdio;
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("skipped: KUBECONFIG is not set (no cluster to test against)");
        return;
    }
    let client = Client::try_default().await.expect("kubeconfig");
    let ns = format!("hvx-console-test-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.clone());
    namespaces
        .create(&PostParams::default(), &n)
        .await
        .expect("namespace");
    let _guard = NamespaceGuard(ns.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // The default service account appears shortly after the namespace.
    let mut created = false;
    for _ in 0..30 {
        if pods
            .create(&PostParams::default(), &fake_launcher_pod("shop", "vm1"))
            .await
            .is_ok()
        {
            created = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(created, "pod creation");
    let mut running = false;
    for _ in 0..180 {
        let p = pods.get("launcher-vm1").await.expect("pod");
        if p.status.and_then(|s| s.phase).as_deref() == Some("Running") {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(running, "launcher pod never ran");

    let mut child = Command::new(BIN)
        // `--app` selects by the application label the operator sets (it once looked
        // for a label no launcher pod carries and never found the pod).
        .args(["console", "vm1", "--app", "shop", "-n", &ns])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn console");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    stdin.write_all(b"hello-console\n").expect("type");
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !String::from_utf8_lossy(&seen).contains("hello-console")
        && std::time::Instant::now() < deadline
    {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.extend(chunk);
        }
    }
    assert!(
        String::from_utf8_lossy(&seen).contains("hello-console"),
        "console output: {:?}",
        String::from_utf8_lossy(&seen)
    );
    // Ctrl-] detaches and the command exits by itself.
    stdin.write_all(&[0x1d]).expect("detach");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "console did not detach"
    );

    let out = Command::new(BIN)
        .args(["console", "nope", "-n", &ns])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running launcher pod for VM nope"));
}
