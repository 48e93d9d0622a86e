//! HTTP import against a server on 127.0.0.1 started here: progress, Range resume after
//! a dropped connection, errors for 404 and non-HTTP URLs.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use hvx_storage::{ImportPhase, ImportSource, StorageError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A store whose http egress policy allows 127.0.0.0/8, where these tests serve
/// (the default refuses loopback: tests/http_policy.rs).
fn loopback_store() -> TestStore {
    store_with(|c| c.http_policy.allowed.push("127.0.0.0/8".parse().unwrap()))
}

/// Serves `body` at /disk.vmdk with Range support. The first `drops` responses stop
/// after half the requested bytes and close the connection. Records Range headers.
async fn serve(body: Vec<u8>, drops: usize) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ranges: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = ranges.clone();
    let body = Arc::new(body);
    let served = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (body, seen, served) = (body.clone(), seen.clone(), served.clone());
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                let req = String::from_utf8_lossy(&req).to_string();
                if !req.starts_with("GET /disk.vmdk ") {
                    let _ = sock.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                    return;
                }
                let start = req
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("range: bytes=")
                            .map(str::to_string)
                    })
                    .map(|r| {
                        seen.lock().unwrap().push(r.clone());
                        r.trim_end_matches('-').parse::<usize>().unwrap()
                    });
                let from = start.unwrap_or(0);
                let part = &body[from..];
                let head = match start {
                    Some(s) => format!(
                        "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {s}-{}/{}\r\nconnection: close\r\n\r\n",
                        part.len(),
                        body.len() - 1,
                        body.len()
                    ),
                    None => format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        part.len()
                    ),
                };
                let _ = sock.write_all(head.as_bytes()).await;
                let n = served.fetch_add(1, Ordering::SeqCst);
                let send = if n < drops {
                    &part[..part.len() / 2]
                } else {
                    part
                };
                let _ = sock.write_all(send).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), ranges)
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn http_import_resumes_after_dropped_connection() {
    let t = loopback_store();
    let raw = t.dir.path().join("orig.raw");
    pattern_raw(&raw, 32);
    let vmdk = t.dir.path().join("d.vmdk");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        raw.to_str().unwrap(),
        vmdk.to_str().unwrap(),
    ]);
    let body = std::fs::read(&vmdk).unwrap();
    let (url, ranges) = serve(body.clone(), 2).await;
    let progress: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let p = progress.clone();
    let base = t
        .store
        .import(
            &ImportSource::Http {
                url: format!("{url}/disk.vmdk"),
                entry: "disk.vmdk".into(),
                ca_pem: None,
            },
            None,
            Some(Arc::new(move |ph, d, tot| {
                if ph == ImportPhase::Fetching {
                    p.lock().unwrap().push((d, tot));
                }
            })),
        )
        .await
        .unwrap();
    // Two resumes, each continuing where the previous attempt stopped.
    let ranges = ranges.lock().unwrap().clone();
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    let half = body.len() / 2;
    assert_eq!(ranges[0], format!("{half}-"));
    assert_eq!(ranges[1], format!("{}-", half + (body.len() - half) / 2));
    assert_eq!(
        *progress.lock().unwrap().last().unwrap(),
        (body.len() as u64, body.len() as u64)
    );
    let d = t
        .store
        .create_disk("ns", "web", &base.digest, None)
        .await
        .unwrap();
    assert!(same_content(&d.active_path, "qcow2", &raw, "raw"));
    // 404 and unsupported schemes are clear errors.
    let err = t
        .store
        .import(
            &ImportSource::Http {
                url: format!("{url}/nope"),
                entry: "x.vmdk".into(),
                ca_pem: None,
            },
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::Download { reason, .. } if reason.contains("404")),
        "{err}"
    );
    let err = t
        .store
        .import(
            &ImportSource::Http {
                url: "file:///etc/passwd".into(),
                entry: "x".into(),
                ca_pem: None,
            },
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Download { .. }), "{err}");
}

/// An `openssl s_server -WWW` process serving a directory over HTTPS; killed on drop.
struct TlsServer(std::process::Child);

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn https_import_trusts_only_the_given_ca() {
    let t = loopback_store();
    let d = t.dir.path();
    let sh = |script: &str| run("bash", &["-c", &format!("cd {} && {script}", d.display())]);
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=hvx-test-ca 2>/dev/null \
        && openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=127.0.0.1 2>/dev/null \
        && printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext \
        && openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 1 -extfile ext 2>/dev/null",
    );
    let www = d.join("www");
    std::fs::create_dir(&www).unwrap();
    let raw = d.join("orig.raw");
    pattern_raw(&raw, 8);
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        raw.to_str().unwrap(),
        www.join("d.vmdk").to_str().unwrap(),
    ]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = TlsServer(
        std::process::Command::new("openssl")
            .args([
                "s_server",
                "-WWW",
                "-quiet",
                "-accept",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("-cert")
            .arg(d.join("srv.pem"))
            .arg("-key")
            .arg(d.join("srv.key"))
            .current_dir(&www)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let url = format!("https://127.0.0.1:{port}/d.vmdk");
    let untrusted = ImportSource::Http {
        url: url.clone(),
        entry: "d.vmdk".into(),
        ca_pem: None,
    };
    let err = t.store.import(&untrusted, None, None).await.unwrap_err();
    assert!(
        matches!(&err, StorageError::Download { reason, .. } if reason.contains("certificate")),
        "{err}"
    );
    let trusted = ImportSource::Http {
        url,
        entry: "d.vmdk".into(),
        ca_pem: Some(std::fs::read(d.join("ca.pem")).unwrap()),
    };
    let base = t.store.import(&trusted, None, None).await.unwrap();
    let disk = t
        .store
        .create_disk("ns", "tls", &base.digest, None)
        .await
        .unwrap();
    assert!(same_content(&disk.active_path, "qcow2", &raw, "raw"));
}

/// An OVA member over HTTP (`HttpOvaMember`): the archive is downloaded (resumed
/// after a dropped connection), the member staged and checked against the manifest;
/// the base is the very one a direct import of the same VMDK makes (the store dedupes
/// by digest: a second import adds no base). A missing member and a truncated
/// archive are clear errors naming the URL, and no download is left behind.
#[tokio::test]
#[ignore = "privileged: make test-integration"]
async fn ova_member_over_http_is_the_same_base_as_the_vmdk() {
    let t = loopback_store();
    let work = t.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let raw = work.join("d.raw");
    pattern_raw(&raw, 8);
    let vmdk = work.join("d1.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        raw.to_str().unwrap(),
        vmdk.to_str().unwrap(),
    ]);
    let ova = work.join("app.ova");
    hvx_storage::ova::write_ova(
        &ova,
        "app",
        "<Envelope/>",
        &[("d1.vmdk".into(), vmdk.clone())],
    )
    .unwrap();
    let ova_bytes = std::fs::read(&ova).unwrap();
    let (base_url, ranges) = serve(ova_bytes.clone(), 1).await;
    let url = format!("{base_url}/disk.vmdk");
    let from_ova = t
        .store
        .import(
            &ImportSource::HttpOvaMember {
                url: url.clone(),
                member: "d1.vmdk".into(),
                ca_pem: None,
            },
            None,
            None,
        )
        .await
        .unwrap();
    assert!(
        !ranges.lock().unwrap().is_empty(),
        "the dropped download was resumed"
    );
    let bases = |t: &TestStore| file_list(&t.dir.path().join("store/bases")).len();
    let before = bases(&t);
    let direct = t
        .store
        .import(
            &ImportSource::Local {
                dir: work.clone(),
                entry: "d1.vmdk".into(),
            },
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(from_ova.digest, direct.digest);
    assert_eq!(bases(&t), before, "the same bytes add no base");
    let d = t
        .store
        .create_disk("ns", "from-ova", &from_ova.digest, None)
        .await
        .unwrap();
    assert!(same_content(&d.active_path, "qcow2", &raw, "raw"));

    let err = t
        .store
        .import(
            &ImportSource::HttpOvaMember {
                url: url.clone(),
                member: "nope.vmdk".into(),
                ca_pem: None,
            },
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::Ova { path, reason } if path.to_str() == Some(url.as_str()) && reason.contains("nope.vmdk")),
        "{err}"
    );

    // The archive cut inside the member: the tar walk says truncated.
    let (cut_url, _) = serve(ova_bytes[..ova_bytes.len() / 2].to_vec(), 0).await;
    let err = t
        .store
        .import(
            &ImportSource::HttpOvaMember {
                url: format!("{cut_url}/disk.vmdk"),
                member: "d1.vmdk".into(),
                ca_pem: None,
            },
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    let downloads = t.dir.path().join("store/downloads");
    assert!(
        file_list(&downloads).is_empty(),
        "no download left behind: {:?}",
        file_list(&downloads)
    );
}
