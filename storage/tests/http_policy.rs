//! The egress policy of http sources against servers on loopback: refused by default
//! with the reason, allowed through an allowed CIDR, and a redirect from an allowed
//! server to a denied address refused at that hop (the denied server never sees a
//! request). Unprivileged: loopback only.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use hvx_storage::StorageError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves `answer` (a whole HTTP response head; `body` appended) to every request on
/// `ip`; counts requests.
async fn serve(ip: &str, head: String, body: Vec<u8>) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let (head, body) = (head.clone(), body.clone());
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (port, hits)
}

async fn serve_bytes(ip: &str, body: &[u8]) -> (u16, Arc<AtomicUsize>) {
    serve(
        ip,
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        ),
        body.to_vec(),
    )
    .await
}

fn refusal(err: &StorageError) -> String {
    match err {
        StorageError::Download { reason, .. } => reason.clone(),
        other => panic!("not a download refusal: {other}"),
    }
}

#[tokio::test]
async fn loopback_is_refused_by_default_and_allowed_by_cidr() {
    let body = b"disk bytes".repeat(100);
    let (port, hits) = serve_bytes("127.0.0.1", &body).await;
    let url = format!("http://127.0.0.1:{port}/d.raw");

    let t = store();
    let err = t
        .store
        .stage_http(&url, "d.raw", None, None)
        .await
        .unwrap_err();
    let why = refusal(&err);
    assert!(why.contains("127.0.0.1 is a loopback address"), "{why}");
    assert!(why.contains("agent.httpSources.allowCIDRs"), "{why}");
    // By name too: "localhost" resolves to loopback.
    let err = t
        .store
        .stage_http(
            &format!("http://localhost:{port}/d.raw"),
            "d.raw",
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(refusal(&err).contains("refused: localhost: "), "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "refused before connecting");

    let allowed = store_with(|c| c.http_policy.allowed.push("127.0.0.1/32".parse().unwrap()));
    let staged = allowed
        .store
        .stage_http(&url, "d.raw", None, None)
        .await
        .unwrap();
    assert_eq!(staged.bytes, body.len() as u64);
    assert_eq!(std::fs::read(staged.dir.join("d.raw")).unwrap(), body);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn every_redirect_hop_is_checked() {
    // 127.0.0.2 holds the "secret"; only 127.0.0.1 is allowed.
    let (secret_port, secret_hits) = serve_bytes("127.0.0.2", b"metadata credentials").await;
    let redirect = |to: String| {
        format!(
            "HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
    };
    let (port, hits) = serve(
        "127.0.0.1",
        redirect(format!("http://127.0.0.2:{secret_port}/latest/meta-data")),
        Vec::new(),
    )
    .await;
    let t = store_with(|c| c.http_policy.allowed.push("127.0.0.1/32".parse().unwrap()));
    let err = t
        .store
        .stage_http(
            &format!("http://127.0.0.1:{port}/d.raw"),
            "d.raw",
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(
        refusal(&err).contains("127.0.0.2 is a loopback address"),
        "{err}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(
        secret_hits.load(Ordering::SeqCst),
        0,
        "the denied hop is never contacted"
    );

    // Also to the metadata address, by literal; and a redirect loop ends.
    let (meta_port, _) = serve(
        "127.0.0.1",
        redirect("http://169.254.169.254/latest/meta-data".into()),
        Vec::new(),
    )
    .await;
    let err = t
        .store
        .stage_http(&format!("http://127.0.0.1:{meta_port}/d"), "d", None, None)
        .await
        .unwrap_err();
    assert!(
        refusal(&err).contains("169.254.169.254 is a link-local address"),
        "{err}"
    );
    let (loop_port, loop_hits) = serve("127.0.0.1", redirect("/again".into()), Vec::new()).await;
    let err = t
        .store
        .stage_http(&format!("http://127.0.0.1:{loop_port}/d"), "d", None, None)
        .await
        .unwrap_err();
    assert!(refusal(&err).contains("more than 5 redirects"), "{err}");
    assert_eq!(loop_hits.load(Ordering::SeqCst), 6);
}
