//! The upload endpoint on loopback, driven by the real `kubectl hvx` upload client,
//! in front of three real node agents' upload stores (in this process, on temp
//! dirs): every chunk lands on two of them, chosen from the disk's UID; a rerun
//! resumes where the copies are (nothing re-sent), also against a new endpoint (an
//! operator that restarted or moved: nothing was kept in it); a copy ahead of the
//! other skips what it has; a one-node cluster keeps one copy; offset conflicts, the
//! size limit, full nodes (507), a declared size, unknown disks, a short body
//! (nothing stored anywhere), authentication and authorization (another namespace's
//! user is refused, also for offset reads). The OverlayDisk lookup and the
//! token/access reviews are tables here; e2e/tests/access.rs asks a real API server.

use futures::StreamExt;
use hvx_import::DiskLocation;
use hvx_node_agent::agent::{Agent, AgentConfig, uploads};
use hvx_operator::upload::{
    Access, Caller, Copies, CopyError, Denied, Disks, Server, UploadBook, UploadSettings,
    UploadTarget, forbidden_text, serve,
};
use hvx_proto::v1 as pb;
use kubectl_hvx::upload::{HttpEndpoint, Progress, Tuning, UploadEndpoint, upload};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::Arc;

struct MapDisks(HashMap<String, UploadTarget>);

impl Disks for MapDisks {
    async fn target(&self, ns: &str, name: &str) -> Result<UploadTarget, String> {
        self.0
            .get(&format!("{ns}/{name}"))
            .cloned()
            .ok_or_else(|| format!("OverlayDisk {ns}/{name} does not exist"))
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

/// The node agents, called in process as their gRPC service calls them.
#[derive(Clone)]
struct Nodes(Arc<BTreeMap<String, Arc<Agent>>>);

fn copy_error(e: hvx_node_agent::agent::error::AgentError) -> CopyError {
    CopyError {
        code: e.code(),
        message: e.to_string(),
    }
}

impl Copies for Nodes {
    async fn nodes(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
    async fn get(&self, node: &str, uid: &str) -> Result<pb::UploadState, CopyError> {
        uploads::get(&self.0[node], uid).await.map_err(copy_error)
    }
    async fn put(
        &self,
        node: &str,
        chunks: tokio::sync::mpsc::Receiver<pb::UploadChunk>,
    ) -> Result<pb::UploadState, CopyError> {
        let stream = tokio_stream::wrappers::ReceiverStream::new(chunks).map(Ok);
        uploads::put(&self.0[node], stream)
            .await
            .map_err(copy_error)
    }
}

struct Fixture {
    base: String,
    dir: tempfile::TempDir,
    nodes: Nodes,
    book: UploadBook,
}

fn nodes(dir: &std::path::Path, count: usize, capacity: Option<u64>) -> Nodes {
    let mut m = BTreeMap::new();
    for i in 1..=count {
        let name = format!("n{i}");
        let agent = Agent::open(AgentConfig {
            upload_capacity_bytes: capacity,
            ..AgentConfig::new(
                &name,
                std::net::Ipv4Addr::LOCALHOST,
                dir.join(&name).join("store"),
                dir.join(&name).join("run"),
            )
        })
        .expect("agent");
        m.insert(name, Arc::new(agent));
    }
    Nodes(Arc::new(m))
}

fn targets() -> HashMap<String, UploadTarget> {
    let mut t = HashMap::new();
    for (key, uid, size) in [
        ("prod/web-root", "uid-web", None),
        ("prod/db-root", "uid-db", Some(12345)),
        ("prod/other", "uid-other", None),
    ] {
        t.insert(
            key.to_string(),
            UploadTarget {
                uid: uid.into(),
                size_bytes: size,
            },
        );
    }
    t
}

/// An endpoint (a fresh one: an operator that just started) in front of `nodes`.
async fn endpoint(nodes: Nodes, max_bytes: u64) -> (String, UploadBook) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let book = UploadBook::default();
    let settings = UploadSettings {
        max_bytes,
        book: book.clone(),
    };
    let server = Server::new(settings, MapDisks(targets()), TableAccess, nodes);
    tokio::spawn(serve(listener, Arc::new(server)));
    (format!("http://{addr}/v1alpha1"), book)
}

async fn start(count: usize, max_bytes: u64, capacity: Option<u64>) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = nodes(dir.path(), count, capacity);
    let (base, book) = endpoint(nodes.clone(), max_bytes).await;
    Fixture {
        base,
        dir,
        nodes,
        book,
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

/// What each node holds of `uid`: (node, offset, complete).
async fn held(nodes: &Nodes, uid: &str) -> Vec<(String, u64, bool)> {
    let mut out = Vec::new();
    for (n, a) in nodes.0.iter() {
        let s = uploads::get(a, uid).await.expect("get");
        if s.offset > 0 || s.complete {
            out.push((n.clone(), s.offset, s.complete));
        }
    }
    out
}

#[tokio::test]
async fn chunks_land_on_two_nodes_and_a_new_endpoint_resumes() {
    let fx = start(3, 1 << 30, None).await;
    let (loc, data) = disk_file(fx.dir.path(), 3 * 1024 * 1024 + 17);
    let total = data.len() as u64;
    let ep = HttpEndpoint::new(&fx.base, "prod", Some("alice-token".into())).expect("endpoint");
    assert_eq!(ep.offset("web-root").await.expect("offset"), 0);

    // First run: one chunk only (as if the user pressed Ctrl-C).
    let first = ep
        .put("web-root", 0, total, data[..1 << 20].to_vec())
        .await
        .expect("chunk 1");
    assert_eq!(first, 1 << 20);
    let copies = held(&fx.nodes, "uid-web").await;
    assert_eq!(copies.len(), 2, "two copies: {copies:?}");
    assert!(copies.iter().all(|(_, o, _)| *o == 1 << 20), "{copies:?}");
    let progress = fx.book.get("uid-web").expect("recorded");
    assert_eq!(
        (progress.bytes_done, progress.bytes_total),
        (1 << 20, total)
    );
    assert!(!progress.complete);
    // A chunk at the wrong offset is refused and changes nothing.
    assert!(ep.put("web-root", 5, total, vec![0; 10]).await.is_err());
    assert_eq!(ep.offset("web-root").await.expect("offset"), 1 << 20);

    // The operator pod is gone: a new endpoint (nothing in memory) resumes from
    // the copies, on the same two nodes.
    let (base2, book2) = endpoint(fx.nodes.clone(), 1 << 30).await;
    let ep2 = HttpEndpoint::new(&base2, "prod", Some("alice-token".into())).expect("endpoint");
    assert_eq!(ep2.offset("web-root").await.expect("offset"), 1 << 20);
    let sent = upload(
        &ep2,
        "web-root",
        &loc,
        tuning(1 << 20),
        &mut Progress::default(),
    )
    .await
    .expect("resumed upload");
    assert_eq!(
        sent,
        total - (1 << 20),
        "the rerun sent only what was missing"
    );
    let after = held(&fx.nodes, "uid-web").await;
    assert_eq!(
        after.iter().map(|(n, _, _)| n.clone()).collect::<Vec<_>>(),
        copies.iter().map(|(n, _, _)| n.clone()).collect::<Vec<_>>(),
        "the same nodes"
    );
    assert!(after.iter().all(|(_, o, c)| *o == total && *c), "{after:?}");
    for (n, _, _) in &after {
        let bytes = std::fs::read(uploads::complete_path(&fx.nodes.0[n], "uid-web")).expect("file");
        assert_eq!(Sha256::digest(&bytes), Sha256::digest(&data), "{n}");
    }
    let done = book2.get("uid-web").expect("recorded");
    assert!(done.complete);
    assert_eq!(done.bytes_done, total);
    assert_eq!(
        done.sha256,
        Sha256::digest(&data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    assert_eq!(ep.offset("web-root").await.expect("offset"), total);
    // A rerun of a complete upload sends nothing.
    let sent = upload(
        &ep,
        "web-root",
        &loc,
        tuning(1 << 20),
        &mut Progress::default(),
    )
    .await
    .expect("complete");
    assert_eq!(sent, 0);
}

#[tokio::test]
async fn a_copy_ahead_skips_what_it_has_and_one_node_keeps_one_copy() {
    let fx = start(2, 1 << 30, None).await;
    let (loc, data) = disk_file(fx.dir.path(), (2 << 20) + 5);
    let total = data.len() as u64;
    let ep = HttpEndpoint::new(&fx.base, "prod", Some("alice-token".into())).expect("endpoint");
    ep.put("web-root", 0, total, data[..1 << 20].to_vec())
        .await
        .expect("chunk 1");
    // One node got the next chunk, the other did not (the operator died between).
    let n1 = &fx.nodes.0["n1"];
    uploads::put(
        n1,
        futures::stream::iter([Ok(pb::UploadChunk {
            disk_uid: "uid-web".into(),
            offset: 1 << 20,
            total,
            data: data[1 << 20..(1 << 20) + 1000].to_vec(),
        })]),
    )
    .await
    .expect("ahead");
    // The user resumes where every copy is; n1 skips its extra bytes.
    assert_eq!(ep.offset("web-root").await.expect("offset"), 1 << 20);
    upload(
        &ep,
        "web-root",
        &loc,
        tuning(1 << 20),
        &mut Progress::default(),
    )
    .await
    .expect("resumed");
    for (n, a) in fx.nodes.0.iter() {
        let bytes = std::fs::read(uploads::complete_path(a, "uid-web")).expect("file");
        assert_eq!(bytes, data, "{n}");
    }

    // A one-node cluster: one copy.
    let one = start(1, 1 << 30, None).await;
    let ep = HttpEndpoint::new(&one.base, "prod", Some("alice-token".into())).expect("endpoint");
    let (loc, data) = disk_file(one.dir.path(), 100_000);
    upload(&ep, "other", &loc, tuning(30_000), &mut Progress::default())
        .await
        .expect("one copy");
    assert_eq!(
        held(&one.nodes, "uid-other").await,
        [("n1".to_string(), data.len() as u64, true)]
    );
}

#[tokio::test]
async fn only_authorized_callers_upload_or_read_offsets() {
    let fx = start(3, 1 << 30, None).await;
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
    assert!(fx.book.get("uid-web").is_none());
    // Nothing was stored by the refused calls; alice's upload starts at 0.
    assert!(held(&fx.nodes, "uid-web").await.is_empty());
    let alice = HttpEndpoint::new(&fx.base, "prod", Some("alice-token".into())).expect("ep");
    assert_eq!(alice.offset("web-root").await.expect("offset"), 0);
    assert_eq!(put(Some("alice-token")).await.expect("alice"), 10);
}

#[tokio::test]
async fn full_nodes_refuse_before_anything_is_written() {
    // Each node takes 3 MiB of uploads: a 2 MiB upload in progress counts whole.
    let fx = start(2, 1 << 30, Some(3 << 20)).await;
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
    .expect_err("no two nodes have room");
    let msg = err.to_string();
    assert!(msg.contains("507"), "{msg}");
    assert!(held(&fx.nodes, "uid-other").await.is_empty());
}

#[tokio::test]
async fn refusals_are_clear() {
    let fx = start(3, 4096, None).await;
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
    // A body shorter than its Content-Range stores nothing on any node.
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
    assert!(
        held(&fx.nodes, "uid-web").await.is_empty(),
        "{:?}",
        held(&fx.nodes, "uid-web").await
    );
}
