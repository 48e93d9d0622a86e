//! The upload client against a real HTTP server on loopback that speaks the protocol,
//! stores bytes, and can cut connections mid-chunk.

use super::*;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Server {
    data: Vec<u8>,
    started: bool,
    puts: usize,
    /// PUT numbers (1-based) that store half the chunk and then drop the connection.
    cut: Vec<usize>,
    /// PUT numbers that answer 503.
    unavailable: Vec<usize>,
    requests: Vec<String>,
}

fn serve(state: Arc<Mutex<Server>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            handle(stream, &state);
        }
    });
    format!("http://{addr}/v1alpha1")
}

fn handle(stream: TcpStream, state: &Arc<Mutex<Server>>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut out = stream;
    let mut s = state.lock().expect("lock");
    s.requests.push(request_line.trim().to_owned());
    let respond = |out: &mut TcpStream, status: &str, offset: Option<usize>| {
        let extra = offset.map_or(String::new(), |o| format!("Upload-Offset: {o}\r\n"));
        let _ = write!(
            out,
            "HTTP/1.1 {status}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
    };
    if request_line.starts_with("HEAD ") {
        if s.started {
            respond(&mut out, "200 OK", Some(s.data.len()));
        } else {
            respond(&mut out, "404 Not Found", None);
        }
        return;
    }
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    s.puts += 1;
    let n = s.puts;
    let range = header("content-range").unwrap_or_default();
    let start: usize = range
        .strip_prefix("bytes ")
        .and_then(|r| r.split('-').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    if s.unavailable.contains(&n) {
        respond(&mut out, "503 Service Unavailable", None);
        return;
    }
    if start != s.data.len() {
        respond(&mut out, "409 Conflict", Some(s.data.len()));
        return;
    }
    s.started = true;
    if s.cut.contains(&n) {
        s.data.extend_from_slice(&body[..len / 2]);
        return; // connection dropped without an answer
    }
    s.data.extend_from_slice(&body);
    respond(&mut out, "204 No Content", Some(s.data.len()));
}

fn disk_file(dir: &std::path::Path, size: usize) -> (DiskLocation, Vec<u8>) {
    let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let path = dir.join("disk.vmdk");
    std::fs::write(&path, &bytes).expect("write");
    (
        DiskLocation::File {
            path,
            size: size as u64,
        },
        bytes,
    )
}

fn fast() -> Tuning {
    Tuning {
        chunk_bytes: 1000,
        max_retries: 3,
        backoff: Duration::from_millis(10),
    }
}

#[tokio::test]
async fn uploads_in_chunks_with_content_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, bytes) = disk_file(dir.path(), 2500);
    let state = Arc::new(Mutex::new(Server::default()));
    let base = serve(state.clone());
    let endpoint = HttpEndpoint::new(&base, "ns1", None).expect("client");
    let sent = upload(
        &endpoint,
        "shop-db-1",
        &source,
        fast(),
        &mut Progress::default(),
    )
    .await
    .expect("upload");
    assert_eq!(sent, 2500);
    let s = state.lock().expect("lock");
    assert_eq!(s.data, bytes);
    assert_eq!(s.puts, 3);
    assert_eq!(
        s.requests[0],
        "HEAD /v1alpha1/namespaces/ns1/overlaydisks/shop-db-1/upload HTTP/1.1"
    );
}

#[tokio::test]
async fn resumes_after_a_cut_connection_and_a_503() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, bytes) = disk_file(dir.path(), 5000);
    let state = Arc::new(Mutex::new(Server {
        cut: vec![2],
        unavailable: vec![4],
        ..Server::default()
    }));
    let base = serve(state.clone());
    let endpoint = HttpEndpoint::new(&base, "ns1", None).expect("client");
    let sent = upload(&endpoint, "d", &source, fast(), &mut Progress::default())
        .await
        .expect("upload survives failures");
    let s = state.lock().expect("lock");
    assert_eq!(s.data, bytes, "every byte exactly once, in order");
    // The cut chunk was half stored: the client resumed from the server's offset.
    assert_eq!(sent, 5000 - 500);
}

#[tokio::test]
async fn a_rerun_continues_where_the_server_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, bytes) = disk_file(dir.path(), 3000);
    let state = Arc::new(Mutex::new(Server {
        data: bytes[..1234].to_vec(),
        started: true,
        ..Server::default()
    }));
    let base = serve(state.clone());
    let endpoint = HttpEndpoint::new(&base, "ns1", None).expect("client");
    let sent = upload(&endpoint, "d", &source, fast(), &mut Progress::default())
        .await
        .expect("resume");
    assert_eq!(sent, 3000 - 1234);
    assert_eq!(state.lock().expect("lock").data, bytes);
}

#[tokio::test]
async fn gives_up_after_the_retry_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, _) = disk_file(dir.path(), 3000);
    let state = Arc::new(Mutex::new(Server {
        unavailable: (1..100).collect(),
        ..Server::default()
    }));
    let base = serve(state.clone());
    let endpoint = HttpEndpoint::new(&base, "ns1", None).expect("client");
    let err = upload(&endpoint, "d", &source, fast(), &mut Progress::default())
        .await
        .expect_err("server always 503");
    assert!(err.to_string().contains("PUT answered 503"), "{err}");
    assert_eq!(state.lock().expect("lock").puts, 4);
}

#[tokio::test]
async fn unreachable_endpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, _) = disk_file(dir.path(), 10);
    // Bind then drop: nothing listens on this loopback port any more.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let endpoint =
        HttpEndpoint::new(&format!("http://127.0.0.1:{port}"), "ns", None).expect("client");
    let err = upload(&endpoint, "d", &source, fast(), &mut Progress::default())
        .await
        .expect_err("nothing listens");
    assert!(err.to_string().starts_with("upload of d failed"), "{err}");
}
