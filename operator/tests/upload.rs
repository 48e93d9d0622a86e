//! The upload endpoint on loopback, driven by the real `kubectl hvx` upload client:
//! a whole upload, a resumed one (nothing re-sent), offset conflicts, the size limit,
//! a declared size, unknown disks, the bearer token, and agents fetching identical
//! bytes. The OverlayDisk lookup is a map here (the cluster path is in the e2e).

use hvx_import::DiskLocation;
use hvx_operator::upload::{Disks, Server, UploadSettings, UploadTarget, fetch_url, serve};
use kubectl_hvx::upload::{HttpEndpoint, Progress, Tuning, UploadEndpoint, upload};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct MapDisks {
    targets: HashMap<String, UploadTarget>,
    reports: Mutex<Vec<(String, serde_json::Value)>>,
}

/// The test's handle on the map (the server owns one, the test another).
struct Shared(Arc<MapDisks>);

impl Disks for Shared {
    async fn target(&self, ns: &str, name: &str) -> Result<UploadTarget, String> {
        self.0
            .targets
            .get(&format!("{ns}/{name}"))
            .cloned()
            .ok_or_else(|| format!("OverlayDisk {ns}/{name} does not exist"))
    }
    async fn report(&self, ns: &str, name: &str, status: serde_json::Value) {
        self.0
            .reports
            .lock()
            .expect("lock")
            .push((format!("{ns}/{name}"), status));
    }
}

struct Fixture {
    base: String,
    dir: tempfile::TempDir,
    disks: Arc<MapDisks>,
    settings: UploadSettings,
}

async fn start(token: Option<&str>, max_bytes: u64) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut targets = HashMap::new();
    targets.insert(
        "prod/web-root".to_string(),
        UploadTarget {
            uid: "uid-web".into(),
            size_bytes: None,
        },
    );
    targets.insert(
        "prod/db-root".to_string(),
        UploadTarget {
            uid: "uid-db".into(),
            size_bytes: Some(12345),
        },
    );
    let disks = Arc::new(MapDisks {
        targets,
        ..Default::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let settings = UploadSettings {
        dir: dir.path().join("uploads"),
        internal_url: format!("http://{addr}"),
        max_bytes,
        token: token.map(str::to_string),
    };
    let server = Server::new(settings.clone(), Shared(disks.clone())).expect("server");
    tokio::spawn(serve(listener, Arc::new(server)));
    Fixture {
        base: format!("http://{addr}/v1alpha1"),
        dir,
        disks,
        settings,
    }
}

fn disk_file(dir: &std::path::Path, len: usize) -> (DiskLocation, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let path = dir.join("disk.vmdk");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(&data))
        .expect("write");
    (
        DiskLocation::File {
            path,
            size: len as u64,
        },
        data,
    )
}

fn tuning(chunk: usize) -> Tuning {
    Tuning {
        chunk_bytes: chunk,
        max_retries: 2,
        backoff: std::time::Duration::from_millis(10),
    }
}

async fn get(url: &str) -> (u16, Vec<u8>) {
    let client = reqwest::Client::new();
    let r = client.get(url).send().await.expect("get");
    let code = r.status().as_u16();
    (code, r.bytes().await.expect("body").to_vec())
}

#[tokio::test]
async fn whole_upload_resume_and_agent_fetch() {
    let fx = start(None, 1 << 30).await;
    let (loc, data) = disk_file(fx.dir.path(), 3 * 1024 * 1024 + 17);
    let ep = HttpEndpoint::new(&fx.base, "prod", None).expect("endpoint");
    assert_eq!(ep.offset("web-root").await.expect("offset"), 0);

    // First run: 2 chunks only (as if the user pressed Ctrl-C), then a rerun resumes.
    let first = ep
        .put("web-root", 0, data.len() as u64, data[..1 << 20].to_vec())
        .await
        .expect("chunk 1");
    assert_eq!(first, 1 << 20);
    assert_eq!(ep.offset("web-root").await.expect("offset"), 1 << 20);
    // A chunk at the wrong offset is refused and changes nothing.
    assert!(
        ep.put("web-root", 5, data.len() as u64, vec![0; 10])
            .await
            .is_err()
    );
    assert_eq!(ep.offset("web-root").await.expect("offset"), 1 << 20);
    let sent = upload(
        &ep,
        "web-root",
        &loc,
        tuning(1 << 20),
        &mut Progress::default(),
    )
    .await
    .expect("resumed upload");
    assert_eq!(
        sent,
        data.len() as u64 - (1 << 20),
        "the rerun sent only what was missing"
    );
    assert_eq!(
        ep.offset("web-root").await.expect("offset"),
        data.len() as u64
    );
    // Completion moved the disk to Pending.
    let reports = fx.disks.reports.lock().expect("lock").clone();
    let last = reports.last().expect("a report");
    assert_eq!(last.1["phase"], "Pending", "{reports:?}");
    assert!(hvx_operator::upload::complete(&fx.settings, "uid-web"));

    // Agents fetch identical bytes.
    let (code, body) = get(&fetch_url(&fx.settings, "uid-web")).await;
    assert_eq!(code, 200);
    assert_eq!(Sha256::digest(&body), Sha256::digest(&data));
    let (code, _) = get(&fetch_url(&fx.settings, "uid-db")).await;
    assert_eq!(code, 404, "incomplete uploads are not served");

    // Deleting the OverlayDisk forgets the bytes.
    hvx_operator::upload::forget(&fx.settings, "uid-web");
    assert!(!hvx_operator::upload::complete(&fx.settings, "uid-web"));
}

#[tokio::test]
async fn refusals_are_clear() {
    let fx = start(Some("s3cret"), 4096).await;
    let no_token = HttpEndpoint::new(&fx.base, "prod", None).expect("endpoint");
    let err = no_token
        .put("web-root", 0, 10, vec![1; 10])
        .await
        .expect_err("token required");
    assert!(err.to_string().contains("401"), "{err}");

    let ep = HttpEndpoint::new(&fx.base, "prod", Some("s3cret".into())).expect("endpoint");
    let err = ep
        .put("web-root", 0, 1 << 20, vec![1; 10])
        .await
        .expect_err("over the limit");
    assert!(err.to_string().contains("413"), "{err}");
    let err = ep
        .put("db-root", 0, 100, vec![1; 100])
        .await
        .expect_err("declared size differs");
    assert!(err.to_string().contains("400"), "{err}");
    let err = ep
        .put("nope", 0, 10, vec![1; 10])
        .await
        .expect_err("unknown disk");
    assert!(err.to_string().contains("404"), "{err}");
    // A body shorter than its Content-Range stores nothing.
    let client = reqwest::Client::new();
    let r = client
        .put(format!(
            "{}/namespaces/prod/overlaydisks/web-root/upload",
            fx.base
        ))
        .bearer_auth("s3cret")
        .header("Content-Range", "bytes 0-99/200")
        .body(vec![1u8; 50])
        .send()
        .await
        .expect("put");
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(ep.offset("web-root").await.expect("offset"), 0);
}
