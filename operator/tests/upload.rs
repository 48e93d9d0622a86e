//! The upload endpoint on loopback, driven by the real `kubectl hvx` upload client:
//! a whole upload, a resumed one (nothing re-sent), offset conflicts, the size limit
//! and the store's capacity, a declared size, unknown disks, authentication and
//! authorization (another namespace's user is refused, also for offset reads), and
//! agents fetching identical bytes only with their key. The OverlayDisk lookup and
//! the token/access reviews are tables here; tests/upload_apiserver.rs asks a real
//! API server.

use hvx_import::DiskLocation;
use hvx_operator::upload::{
    Access, Caller, Denied, Disks, FetchSecret, Server, UploadSettings, UploadTarget, fetch_url,
    forbidden_text, serve,
};
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

/// Tokens: "alice" may upload to prod, "mallory" only to her own namespace "lab".
struct TableAccess;

impl Access for TableAccess {
    async fn authenticate(&self, token: &str) -> Result<Caller, Denied> {
        match token {
            "alice-token" | "mallory-token" => Ok(Caller {
                username: token.trim_end_matches("-token").into(),
                ..Default::default()
            }),
            _ => Err(Denied::Unauthenticated("unknown token".into())),
        }
    }
    async fn authorize(
        &self,
        caller: &Caller,
        verb: &str,
        ns: &str,
        name: &str,
    ) -> Result<(), Denied> {
        match (caller.username.as_str(), ns) {
            ("alice", "prod") | ("mallory", "lab") => Ok(()),
            _ => Err(Denied::Forbidden(forbidden_text(caller, verb, ns, name))),
        }
    }
}

struct Fixture {
    base: String,
    dir: tempfile::TempDir,
    disks: Arc<MapDisks>,
    settings: UploadSettings,
}

async fn start(max_bytes: u64, capacity_bytes: u64) -> Fixture {
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
    targets.insert(
        "prod/other".to_string(),
        UploadTarget {
            uid: "uid-other".into(),
            size_bytes: None,
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
        capacity_bytes,
        fetch_secret: FetchSecret(vec![7; 32]),
    };
    let server = Server::new(settings.clone(), Shared(disks.clone()), TableAccess).expect("server");
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
    let fx = start(1 << 30, 1 << 30).await;
    let (loc, data) = disk_file(fx.dir.path(), 3 * 1024 * 1024 + 17);
    let ep = HttpEndpoint::new(&fx.base, "prod", Some("alice-token".into())).expect("endpoint");
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
    // Without the key, or with another upload's key, nothing is served.
    let bare = fetch_url(&fx.settings, "uid-web");
    let bare = bare.split('?').next().expect("path");
    assert_eq!(get(bare).await.0, 403);
    let other_key = fetch_url(&fx.settings, "uid-db");
    let other_key = other_key.split('?').nth(1).expect("query");
    assert_eq!(get(&format!("{bare}?{other_key}")).await.0, 403);

    // Deleting the OverlayDisk forgets the bytes.
    hvx_operator::upload::forget(&fx.settings, "uid-web");
    assert!(!hvx_operator::upload::complete(&fx.settings, "uid-web"));
}

#[tokio::test]
async fn only_authorized_callers_upload_or_read_offsets() {
    let fx = start(1 << 30, 1 << 30).await;
    let put = |token: Option<&str>| {
        let ep = HttpEndpoint::new(&fx.base, "prod", token.map(str::to_string)).expect("endpoint");
        async move { ep.put("web-root", 0, 10, vec![1; 10]).await }
    };
    let err = put(None).await.expect_err("token required");
    assert!(err.to_string().contains("401"), "{err}");
    assert!(err.to_string().contains("bearer token"), "{err}");
    let err = put(Some("forged")).await.expect_err("unknown token");
    assert!(err.to_string().contains("401"), "{err}");
    // Another namespace's user: refused, for writes and for offset reads, and told
    // nothing about the disk (the same answer for a disk that does not exist).
    let err = put(Some("mallory-token")).await.expect_err("other tenant");
    let msg = err.to_string();
    assert!(msg.contains("refused") && msg.contains("403"), "{msg}");
    assert!(
        msg.contains("mallory may not create overlaydisks/upload web-root in namespace prod"),
        "{msg}"
    );
    let mallory = HttpEndpoint::new(&fx.base, "prod", Some("mallory-token".into())).expect("ep");
    let err = mallory.offset("web-root").await.expect_err("offset read");
    assert!(err.to_string().contains("403"), "{err}");
    let err = mallory
        .put("nope", 0, 10, vec![1; 10])
        .await
        .expect_err("no such disk");
    assert!(err.to_string().contains("403"), "{err}");
    assert!(fx.disks.reports.lock().expect("lock").is_empty());
    // Nothing was stored by the refused calls; alice's upload starts at 0.
    let alice = HttpEndpoint::new(&fx.base, "prod", Some("alice-token".into())).expect("ep");
    assert_eq!(alice.offset("web-root").await.expect("offset"), 0);
    assert_eq!(put(Some("alice-token")).await.expect("alice"), 10);
}

#[tokio::test]
async fn the_store_capacity_refuses_before_eviction() {
    // Room for 3 MiB in all: a 2 MiB upload in progress reserves its whole size.
    let fx = start(1 << 30, 3 << 20).await;
    let ep = HttpEndpoint::new(&fx.base, "prod", Some("alice-token".into())).expect("endpoint");
    ep.put("web-root", 0, 2 << 20, vec![1; 1024])
        .await
        .expect("first chunk of 2 MiB");
    let offset = ep
        .put("db-root", 0, 12345, vec![1; 10])
        .await
        .expect("12345 bytes still fit");
    assert_eq!(offset, 10);
    let (loc, _) = disk_file(fx.dir.path(), (1 << 20) + 1);
    let err = upload(
        &ep,
        "other",
        &loc,
        tuning(1 << 20),
        &mut Progress::default(),
    )
    .await
    .expect_err("over the capacity");
    let msg = err.to_string();
    assert!(
        msg.contains("413") && msg.contains("upload.sizeLimit"),
        "{msg}"
    );
}

#[tokio::test]
async fn refusals_are_clear() {
    let fx = start(4096, 1 << 30).await;
    let ep = HttpEndpoint::new(&fx.base, "prod", Some("alice-token".into())).expect("endpoint");
    let err = ep
        .put("web-root", 0, 1 << 20, vec![1; 10])
        .await
        .expect_err("over the limit");
    assert!(err.to_string().contains("413"), "{err}");
    assert!(err.to_string().contains("upload.maxBytes"), "{err}");
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
        .bearer_auth("alice-token")
        .header("Content-Range", "bytes 0-99/200")
        .body(vec![1u8; 50])
        .send()
        .await
        .expect("put");
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(ep.offset("web-root").await.expect("offset"), 0);
}
