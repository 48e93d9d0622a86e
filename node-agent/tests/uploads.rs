//! Agent-level: PutUpload and GetUpload with hostile inputs (wrong offset, a changed
//! total, bytes past the total, bad UIDs, a full store: a tiny upload capacity), a
//! broken stream cut back to its start, the completed upload imported by PrepareDisk
//! from the node's own store, and its base relayed to a second node by digest
//! (ExportBase into ImportBase: a tampered checksum installs nothing). Two agents on
//! temp directories in this process; no privileges needed (qemu-img converts).

use futures::StreamExt;
use hvx_node_agent::agent::{Agent, AgentConfig, bases, disks, uploads};
use hvx_proto::v1 as pb;
use sha2::{Digest, Sha256};
use std::sync::Arc;

const UID: &str = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0";

fn agent(dir: &std::path::Path, capacity: Option<u64>) -> Arc<Agent> {
    Arc::new(
        Agent::open(AgentConfig {
            upload_capacity_bytes: capacity,
            ..AgentConfig::new(
                "n1",
                std::net::Ipv4Addr::LOCALHOST,
                dir.join("store"),
                dir.join("run"),
            )
        })
        .expect("agent"),
    )
}

fn chunk(uid: &str, offset: u64, total: u64, data: &[u8]) -> pb::UploadChunk {
    pb::UploadChunk {
        disk_uid: uid.into(),
        offset,
        total,
        data: data.to_vec(),
    }
}

async fn put(
    a: &Agent,
    chunks: Vec<Result<pb::UploadChunk, tonic::Status>>,
) -> Result<pb::UploadState, hvx_node_agent::agent::error::AgentError> {
    uploads::put(a, futures::stream::iter(chunks)).await
}

/// A raw disk image: 2 MiB with data in it.
fn image() -> Vec<u8> {
    (0..2 << 20).map(|i: usize| (i * 13 % 241) as u8).collect()
}

#[tokio::test]
async fn hostile_uploads_are_refused_and_nothing_is_half_written() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = agent(tmp.path(), Some(10 << 20));
    let data = image();
    let total = data.len() as u64;

    // Bad UIDs never become file names.
    for bad in ["", "../x", "a/b", "x.part"] {
        let e = put(&a, vec![Ok(chunk(bad, 0, total, b"x"))])
            .await
            .expect_err(bad);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}: {e}");
        assert!(uploads::get(&a, bad).await.is_err(), "{bad}");
    }
    // Nothing held yet; room is the capacity.
    let s = uploads::get(&a, UID).await.expect("get");
    assert_eq!((s.offset, s.total, s.complete), (0, 0, false));
    assert_eq!(s.room_bytes, 10 << 20);

    // More than the node may take: refused before anything is written.
    let e = put(&a, vec![Ok(chunk(UID, 0, 11 << 20, b"x"))])
        .await
        .expect_err("full");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert_eq!(uploads::get(&a, UID).await.expect("get").offset, 0);

    // First chunk in two messages.
    let s = put(
        &a,
        vec![
            Ok(chunk(UID, 0, total, &data[..1000])),
            Ok(chunk("", 1000, 0, &data[1000..4096])),
        ],
    )
    .await
    .expect("first chunk");
    assert_eq!((s.offset, s.total, s.complete), (4096, total, false));
    // Room for this upload's rest: other uploads would count, this one does not.
    assert_eq!(s.room_bytes, 10 << 20);

    // Wrong offsets name the expected one.
    for wrong in [0, 4000, 5000] {
        let e = put(&a, vec![Ok(chunk(UID, wrong, total, &data[..10]))])
            .await
            .expect_err("offset");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("offset 4096"), "{e}");
    }
    // The total is fixed by the first write.
    let e = put(&a, vec![Ok(chunk(UID, 4096, total + 1, &data[4096..5000]))])
        .await
        .expect_err("total");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    // Bytes past the total.
    let mut long = data[4096..].to_vec();
    long.push(0);
    let e = put(&a, vec![Ok(chunk(UID, 4096, total, &long))])
        .await
        .expect_err("past the total");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    // One stream naming two disks.
    let e = put(
        &a,
        vec![
            Ok(chunk(UID, 4096, total, &data[4096..5000])),
            Ok(chunk("other-uid", 5000, total, &data[5000..6000])),
        ],
    )
    .await
    .expect_err("two disks");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    // A stream that breaks after some bytes is cut back to its start.
    let e = put(
        &a,
        vec![
            Ok(chunk(UID, 4096, total, &data[4096..8192])),
            Err(tonic::Status::cancelled("client went away")),
        ],
    )
    .await
    .expect_err("broken");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert_eq!(uploads::get(&a, UID).await.expect("get").offset, 4096);

    // The rest completes it, hashed.
    let rest: Vec<_> = data[4096..]
        .chunks(300_000)
        .scan(4096u64, |at, c| {
            let m = chunk(UID, *at, total, c);
            *at += c.len() as u64;
            Some(Ok(m))
        })
        .collect();
    let s = put(&a, rest).await.expect("rest");
    assert!(s.complete);
    assert_eq!(s.offset, total);
    let sum: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(s.sha256, sum);
    assert_eq!(
        std::fs::read(uploads::complete_path(&a, UID)).expect("complete file"),
        data
    );
    // Repeating the last chunk of a complete upload answers complete; a different
    // total is refused.
    let again = put(&a, vec![Ok(chunk(UID, total - 10, total, &data[..10]))])
        .await
        .expect("already complete");
    assert!(again.complete);
    let e = put(&a, vec![Ok(chunk(UID, 0, 5, b"abcde"))])
        .await
        .expect_err("different upload");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    // PrepareDisk imports it from this node's store, with the usual checks.
    let req = pb::PrepareDiskRequest {
        disk_uid: UID.into(),
        namespace: "prod".into(),
        name: "web-root".into(),
        source: Some(pb::DiskSource {
            kind: Some(pb::disk_source::Kind::Upload(UID.into())),
        }),
        format: "auto".into(),
        expected_checksum: String::new(),
    };
    let ready = prepared(&a, req.clone()).await;
    assert_eq!(
        ready.phase,
        pb::disk_progress::Phase::Ready as i32,
        "{ready:?}"
    );
    assert_eq!(ready.digest, format!("sha256:{sum}"));
    assert_eq!(ready.virtual_bytes, total);
    // Another disk naming this disk's upload as its source: refused.
    let mut other = req.clone();
    other.disk_uid = "1b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0".into();
    let e = disks::prepare(&a, other).expect_err("another disk's upload");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    // A second node gets the base by digest; a tampered checksum installs nothing.
    let tmp2 = tempfile::tempdir().expect("tmp2");
    let b = agent(tmp2.path(), None);
    let mut msgs = exported(&a, &ready.digest).await;
    assert!(msgs.len() >= 3, "header, data, checksum");
    let good = msgs.clone();
    if let Some(pb::BaseChunk {
        part: Some(pb::base_chunk::Part::Sha256(s)),
    }) = msgs.last_mut()
    {
        *s = "0".repeat(64);
    }
    let e = bases::import(&b, futures::stream::iter(msgs.into_iter().map(Ok)))
        .await
        .expect_err("tampered");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(b.store.bases().expect("bases").is_empty());
    let mut good = good;
    if let Some(pb::BaseChunk {
        part: Some(pb::base_chunk::Part::Header(h)),
    }) = good.first_mut()
    {
        h.disk_uid = UID.into();
        h.detected_format = "raw/".into();
    }
    let p = bases::import(&b, futures::stream::iter(good.clone().into_iter().map(Ok)))
        .await
        .expect("relayed");
    assert_eq!(p.digest, ready.digest);
    // The disk is recorded as imported there: PrepareDisk answers Ready at once,
    // without any upload on that node.
    let there = prepared(&b, req).await;
    assert_eq!(there.phase, pb::disk_progress::Phase::Ready as i32);
    assert_eq!(there.digest, ready.digest);
    // Again: idempotent (the base is already there).
    bases::import(&b, futures::stream::iter(good.into_iter().map(Ok)))
        .await
        .expect("again");
    // A digest the node lacks is not exported.
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let e = bases::export(
        b.clone(),
        pb::ExportBaseRequest {
            digest: format!("sha256:{}", "a".repeat(64)),
        },
        tx,
    )
    .await
    .expect_err("missing");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    // Releasing the disk removes the upload too.
    disks::release(&a, UID).await.expect("release");
    assert!(!uploads::complete_path(&a, UID).exists());
    let s = uploads::get(&a, UID).await.expect("get");
    assert_eq!((s.offset, s.complete), (0, false));
}

async fn prepared(a: &Arc<Agent>, req: pb::PrepareDiskRequest) -> pb::DiskProgress {
    let mut rx = disks::prepare(a, req).expect("prepare");
    loop {
        let p = rx.borrow_and_update().clone();
        if disks::is_final(&p) {
            return p;
        }
        if rx.changed().await.is_err() {
            return rx.borrow().clone();
        }
    }
}

async fn exported(a: &Arc<Agent>, digest: &str) -> Vec<pb::BaseChunk> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    bases::export(
        a.clone(),
        pb::ExportBaseRequest {
            digest: digest.into(),
        },
        tx,
    )
    .await
    .expect("export");
    tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|r| r.expect("chunk"))
        .collect()
        .await
}
