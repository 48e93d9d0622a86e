//! The disk upload endpoint: the server side of `kubectl hvx import --upload`
//! (protocol in cli/README.md). It runs in the operator process, behind the
//! `hvx-upload` Service; users reach it through the API server's service proxy, so
//! Kubernetes authentication and RBAC (`services/proxy`) apply.
//!
//! Bytes land in `<dir>/<disk uid>.part`, appended in order (a chunk is accepted only
//! at the stored offset, fsynced before the answer), so a cut connection or a rerun
//! resumes where the server is. The last byte renames the file to `.complete` and
//! moves the OverlayDisk from `WaitingForUpload` to `Pending`; the agent of the node
//! that runs a VM using it then imports it over HTTP from `/v1alpha1/uploads/<uid>`
//! like any HTTP disk, with all of the agent's format checks. Why not straight to
//! the node: the upload happens before any VM is scheduled, so no node is known yet.

use crate::error::Error;
use bytes::Bytes;
use futures::TryStreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hvx_api::OverlayDisk;
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Largest chunk one PUT may carry.
pub const MAX_CHUNK: u64 = 64 << 20;

pub use hvx_operator_core::context::UploadSettings;

/// An OverlayDisk that takes uploads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadTarget {
    /// Its UID (the file name).
    pub uid: String,
    /// Declared size, if any.
    pub size_bytes: Option<u64>,
}

/// How the server finds disks and reports progress (the cluster, or a map in tests).
pub trait Disks: Send + Sync + 'static {
    /// The upload target `ns/name`, or why there is none (404 text).
    fn target(
        &self,
        ns: &str,
        name: &str,
    ) -> impl std::future::Future<Output = Result<UploadTarget, String>> + Send;
    /// Merges `status` into the disk's status.
    fn report(
        &self,
        ns: &str,
        name: &str,
        status: serde_json::Value,
    ) -> impl std::future::Future<Output = ()> + Send;
}

/// The cluster's OverlayDisks.
#[derive(Clone)]
pub struct KubeDisks(pub kube::Client);

impl std::fmt::Debug for KubeDisks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeDisks")
    }
}

impl Disks for KubeDisks {
    async fn target(&self, ns: &str, name: &str) -> Result<UploadTarget, String> {
        let api: Api<OverlayDisk> = Api::namespaced(self.0.clone(), ns);
        match api.get_opt(name).await {
            Ok(Some(d)) => match &d.spec.source.upload {
                Some(u) => Ok(UploadTarget {
                    uid: d.metadata.uid.clone().unwrap_or_default(),
                    size_bytes: u.size_bytes,
                }),
                None => Err(format!(
                    "OverlayDisk {ns}/{name} does not take uploads (its source is not `upload`)"
                )),
            },
            Ok(None) => Err(format!(
                "OverlayDisk {ns}/{name} does not exist: apply the manifests first"
            )),
            Err(e) => Err(format!("looking up OverlayDisk {ns}/{name}: {e}")),
        }
    }

    async fn report(&self, ns: &str, name: &str, status: serde_json::Value) {
        let api: Api<OverlayDisk> = Api::namespaced(self.0.clone(), ns);
        if let Err(e) = api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": status })),
            )
            .await
        {
            tracing::warn!(disk = %format!("{ns}/{name}"), error = %e, "upload status");
        }
    }
}

/// A parsed `Content-Range: bytes S-E/T`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentRange {
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
    /// Whole size.
    pub total: u64,
}

/// Parses a Content-Range header (only the complete `bytes S-E/T` form).
pub fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (s, e) = range.split_once('-')?;
    let (start, end, total) = (
        s.trim().parse().ok()?,
        e.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (start <= end && end < total).then_some(ContentRange { start, end, total })
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
}

fn uid_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The routes, pure: what a method and path ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// HEAD/PUT of a disk's upload.
    Upload {
        /// Namespace.
        ns: String,
        /// OverlayDisk name.
        name: String,
    },
    /// GET of a completed upload (agents).
    Fetch {
        /// Disk UID.
        uid: String,
    },
    /// Liveness.
    Health,
}

/// Maps a path to a route (names validated: they become file names and API calls).
pub fn route(path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match parts.as_slice() {
        ["", "healthz"] => Some(Route::Health),
        ["", "v1alpha1", "uploads", uid] if uid_ok(uid) => Some(Route::Fetch {
            uid: uid.to_string(),
        }),
        [
            "",
            "v1alpha1",
            "namespaces",
            ns,
            "overlaydisks",
            name,
            "upload",
        ] if dns_label(ns) && dns_label(name) => Some(Route::Upload {
            ns: ns.to_string(),
            name: name.to_string(),
        }),
        _ => None,
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn text(code: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg.into() + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r
}

fn with_offset(code: StatusCode, offset: u64, msg: &str) -> Response<Body> {
    let mut r = text(code, msg);
    if let Ok(v) = offset.to_string().parse() {
        r.headers_mut().insert("upload-offset", v);
    }
    r
}

/// The upload server.
#[derive(Debug)]
pub struct Server<D> {
    settings: UploadSettings,
    disks: D,
    /// One writer per disk at a time; last progress report per disk.
    state: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Instant>>>>,
}

impl<D: Disks> Server<D> {
    /// A server storing into `settings.dir` (created).
    pub fn new(settings: UploadSettings, disks: D) -> Result<Self, Error> {
        std::fs::create_dir_all(&settings.dir).map_err(|e| Error::Build {
            object: settings.dir.display().to_string(),
            reason: format!("creating the upload directory: {e}"),
        })?;
        Ok(Self {
            settings,
            disks,
            state: Mutex::default(),
        })
    }

    fn part(&self, uid: &str) -> PathBuf {
        self.settings.dir.join(format!("{uid}.part"))
    }

    fn complete(&self, uid: &str) -> PathBuf {
        self.settings.dir.join(format!("{uid}.complete"))
    }

    fn size(p: &Path) -> Option<u64> {
        std::fs::metadata(p).ok().map(|m| m.len())
    }

    /// Bytes stored for `uid` and whether the upload is complete.
    pub fn offset(&self, uid: &str) -> (u64, bool) {
        match Self::size(&self.complete(uid)) {
            Some(n) => (n, true),
            None => (Self::size(&self.part(uid)).unwrap_or(0), false),
        }
    }

    /// Whether `uid` is completely uploaded.
    pub fn is_complete(&self, uid: &str) -> bool {
        self.complete(uid).is_file()
    }

    /// Removes everything stored for `uid` (OverlayDisk deleted).
    pub fn forget(&self, uid: &str) {
        if uid_ok(uid) {
            let _ = std::fs::remove_file(self.part(uid));
            let _ = std::fs::remove_file(self.complete(uid));
        }
    }

    fn lock_of(&self, uid: &str) -> Arc<tokio::sync::Mutex<Instant>> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(uid.to_string())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(
                    Instant::now() - Duration::from_secs(60),
                ))
            })
            .clone()
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.settings.token else {
            return true;
        };
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t.trim() == token)
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(route) = route(req.uri().path()) else {
            return text(StatusCode::NOT_FOUND, "no such endpoint");
        };
        match (route, req.method().clone()) {
            (Route::Health, Method::GET) => text(StatusCode::OK, "ok"),
            (Route::Fetch { uid }, Method::GET) => self.fetch(&uid).await,
            (Route::Upload { ns, name }, m) if m == Method::HEAD || m == Method::PUT => {
                if !self.authorized(&req) {
                    return text(StatusCode::UNAUTHORIZED, "bad or missing bearer token");
                }
                let target = match self.disks.target(&ns, &name).await {
                    Ok(t) if uid_ok(&t.uid) => t,
                    Ok(_) => return text(StatusCode::NOT_FOUND, "the OverlayDisk has no UID"),
                    Err(msg) => return text(StatusCode::NOT_FOUND, msg),
                };
                if m == Method::HEAD {
                    let (offset, _) = self.offset(&target.uid);
                    if offset == 0 {
                        return text(StatusCode::NOT_FOUND, "nothing stored yet");
                    }
                    return with_offset(StatusCode::OK, offset, "");
                }
                self.put(&ns, &name, &target, req).await
            }
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here"),
        }
    }

    async fn put(
        &self,
        ns: &str,
        name: &str,
        target: &UploadTarget,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let Some(range) = req
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_content_range)
        else {
            return text(
                StatusCode::BAD_REQUEST,
                "Content-Range: bytes S-E/TOTAL is required",
            );
        };
        if range.total > self.settings.max_bytes {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{} bytes is over this server's limit of {}",
                    range.total, self.settings.max_bytes
                ),
            );
        }
        if let Some(declared) = target.size_bytes
            && declared != range.total
        {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "the OverlayDisk declares {declared} bytes, the upload {}",
                    range.total
                ),
            );
        }
        let len = range.end - range.start + 1;
        if len > MAX_CHUNK {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("chunks are at most {MAX_CHUNK} bytes"),
            );
        }
        let lock = self.lock_of(&target.uid);
        let mut last_report = lock.lock().await;
        let (offset, complete) = self.offset(&target.uid);
        if complete {
            return if offset == range.total {
                with_offset(StatusCode::OK, offset, "already complete")
            } else {
                with_offset(
                    StatusCode::CONFLICT,
                    offset,
                    "a different upload is complete",
                )
            };
        }
        if range.start != offset {
            return with_offset(
                StatusCode::CONFLICT,
                offset,
                "the server holds a different offset",
            );
        }
        let part = self.part(&target.uid);
        let written = match self.append(&part, offset, len, req.into_body()).await {
            Ok(n) => n,
            Err((code, msg)) => return with_offset(code, offset, &msg),
        };
        let now = offset + written;
        if now == range.total {
            if let Err(e) = std::fs::rename(&part, self.complete(&target.uid)) {
                return with_offset(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    now,
                    &format!("finishing: {e}"),
                );
            }
            tracing::info!(disk = %format!("{ns}/{name}"), bytes = now, "upload complete");
            self.disks
                .report(
                    ns,
                    name,
                    json!({"phase": "Pending", "bytesDone": now, "bytesTotal": range.total,
                           "progress": format!("uploaded {now} bytes; imported on the node that runs a VM using it")}),
                )
                .await;
        } else if last_report.elapsed() > Duration::from_secs(3) {
            *last_report = Instant::now();
            self.disks
                .report(
                    ns,
                    name,
                    json!({"phase": "WaitingForUpload", "bytesDone": now, "bytesTotal": range.total,
                           "progress": format!("uploading: {}%", now * 100 / range.total.max(1))}),
                )
                .await;
        }
        with_offset(StatusCode::NO_CONTENT, now, "")
    }

    /// Appends exactly `len` body bytes at `offset`; on any failure the file is cut
    /// back to `offset`, so a chunk is all or nothing.
    async fn append(
        &self,
        part: &Path,
        offset: u64,
        len: u64,
        body: Incoming,
    ) -> Result<u64, (StatusCode, String)> {
        let io = |e: std::io::Error| {
            let code = if e.raw_os_error() == Some(28) {
                StatusCode::INSUFFICIENT_STORAGE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            (code, format!("storing the chunk: {e}"))
        };
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(part)
            .await
            .map_err(io)?;
        f.set_len(offset).await.map_err(io)?;
        let mut f = tokio::io::BufWriter::new(f);
        tokio::io::AsyncSeekExt::seek(&mut f, std::io::SeekFrom::Start(offset))
            .await
            .map_err(io)?;
        let mut body = body;
        let mut n: u64 = 0;
        let result: Result<(), (StatusCode, String)> = async {
            while let Some(frame) = body.frame().await {
                let frame = frame
                    .map_err(|e| (StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    n += data.len() as u64;
                    if n > len {
                        return Err((
                            StatusCode::BAD_REQUEST,
                            "the body is longer than Content-Range says".into(),
                        ));
                    }
                    f.write_all(&data).await.map_err(io)?;
                }
            }
            if n != len {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!("the body has {n} bytes, Content-Range says {len}"),
                ));
            }
            f.flush().await.map_err(io)?;
            f.get_ref().sync_data().await.map_err(io)
        }
        .await;
        if let Err(e) = result {
            let _ = f.get_ref().set_len(offset).await;
            return Err(e);
        }
        Ok(n)
    }

    async fn fetch(&self, uid: &str) -> Response<Body> {
        let path = self.complete(uid);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(_) => return text(StatusCode::NOT_FOUND, "no completed upload with this UID"),
        };
        let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map_ok(Frame::data);
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        if let Ok(v) = len.to_string().parse() {
            r.headers_mut().insert("content-length", v);
        }
        r
    }
}

/// Removes what is stored for `uid` (the OverlayDisk was deleted).
pub fn forget(settings: &UploadSettings, uid: &str) {
    if uid_ok(uid) {
        for ext in ["part", "complete"] {
            let _ = std::fs::remove_file(settings.dir.join(format!("{uid}.{ext}")));
        }
    }
}

/// Whether the upload of `uid` is complete (this process stores uploads).
pub fn complete(settings: &UploadSettings, uid: &str) -> bool {
    uid_ok(uid) && settings.dir.join(format!("{uid}.complete")).is_file()
}

/// The in-cluster URL agents import a completed upload from.
pub fn fetch_url(settings: &UploadSettings, uid: &str) -> String {
    format!(
        "{}/v1alpha1/uploads/{uid}",
        settings.internal_url.trim_end_matches('/')
    )
}

/// Serves on `listener` until the task is dropped.
pub async fn serve<D: Disks>(listener: tokio::net::TcpListener, server: Arc<Server<D>>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, std::convert::Infallible>(server.handle(req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                .await
            {
                tracing::debug!(error = %e, "upload connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some(ContentRange {
                start: 0,
                end: 9,
                total: 100
            })
        );
        for bad in [
            "bytes 10-9/100",
            "bytes 0-100/100",
            "0-9/100",
            "bytes 0-9/*",
            "bytes a-9/100",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn routes_validate_names() {
        assert_eq!(
            route("/v1alpha1/namespaces/prod/overlaydisks/web-root/upload"),
            Some(Route::Upload {
                ns: "prod".into(),
                name: "web-root".into()
            })
        );
        assert_eq!(
            route("/v1alpha1/uploads/0b1c-2d"),
            Some(Route::Fetch {
                uid: "0b1c-2d".into()
            })
        );
        for bad in [
            "/v1alpha1/namespaces/../overlaydisks/x/upload",
            "/v1alpha1/namespaces/Prod/overlaydisks/x/upload",
            "/v1alpha1/uploads/..",
            "/v1alpha1/uploads/a%2Fb",
            "/etc/passwd",
        ] {
            assert_eq!(route(bad), None, "{bad}");
        }
        assert_eq!(route("/healthz"), Some(Route::Health));
    }
}
