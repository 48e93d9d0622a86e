//! The disk upload endpoint: the server side of `kubectl hvx import --upload`
//! (protocol in cli/README.md). It runs in the operator process, behind the
//! `hvx-upload` Service; users reach it through the API server's service proxy,
//! `kubectl port-forward` or the Service itself (a NetworkPolicy keeps pods out).
//!
//! Every disk request carries the caller's own Kubernetes bearer token
//! (`Authorization`, or `X-Hvx-Upload-Authorization` through the service proxy, which
//! consumes `Authorization`): a TokenReview says who it is, a SubjectAccessReview
//! whether they may `create` (PUT) or `get` (HEAD: the offset) the subresource
//! `overlaydisks/upload` of that disk, so namespace RBAC decides, not reachability.
//! Positive answers are cached for `CACHE_TTL`. Agents fetch completed uploads with
//! a per-upload key (HMAC of the UID under a secret only this process holds).
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
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Largest chunk one PUT may carry.
pub const MAX_CHUNK: u64 = 64 << 20;

/// How long a positive TokenReview or SubjectAccessReview answer is reused: short,
/// so a revoked binding or token stops working within seconds, long enough that an
/// upload's 8 MiB chunks do not each cost two API calls.
pub const CACHE_TTL: Duration = Duration::from_secs(10);

/// The header carrying the caller's token through the API server's service proxy.
pub const PROXY_AUTH_HEADER: &str = "x-hvx-upload-authorization";

pub use hvx_operator_core::context::{FetchSecret, UploadSettings};

/// Who a request comes from (a TokenReview's answer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// User name (`system:serviceaccount:ns:name` for ServiceAccounts).
    pub username: String,
    /// User UID.
    pub uid: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Extra attributes (e.g. the node a pod-bound token belongs to).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Why a request is refused before any disk is touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No token or an invalid one (401).
    Unauthenticated(String),
    /// Authenticated but not allowed (403).
    Forbidden(String),
    /// The API server could not be asked (503: retry).
    Unavailable(String),
}

/// Who may do what: the API server (TokenReview, SubjectAccessReview), or a table in
/// tests.
pub trait Access: Send + Sync + 'static {
    /// Who holds `token`.
    fn authenticate(
        &self,
        token: &str,
    ) -> impl std::future::Future<Output = Result<Caller, Denied>> + Send;
    /// Whether `caller` may `verb` (`create`, `get`) `overlaydisks/upload` `ns/name`.
    fn authorize(
        &self,
        caller: &Caller,
        verb: &str,
        ns: &str,
        name: &str,
    ) -> impl std::future::Future<Output = Result<(), Denied>> + Send;
}

/// (user, user uid, verb, namespace, disk) of a positive SubjectAccessReview.
type GrantKey = (String, String, String, String, String);

/// The API server's answers, positive ones cached for `CACHE_TTL`.
pub struct KubeAccess {
    client: kube::Client,
    /// sha256(token) -> caller.
    callers: Mutex<HashMap<[u8; 32], (Caller, Instant)>>,
    /// (user, uid, verb, ns, name) -> allowed at.
    grants: Mutex<HashMap<GrantKey, Instant>>,
}

impl std::fmt::Debug for KubeAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeAccess")
    }
}

impl KubeAccess {
    /// Asks the API server `client` talks to.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            callers: Mutex::default(),
            grants: Mutex::default(),
        }
    }
}

/// The SubjectAccessReview for `caller` doing `verb` on the upload of `ns/name` (pure).
pub fn access_review(
    caller: &Caller,
    verb: &str,
    ns: &str,
    name: &str,
) -> k8s_openapi::api::authorization::v1::SubjectAccessReview {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(caller.username.clone()),
            uid: Some(caller.uid.clone()).filter(|u| !u.is_empty()),
            groups: Some(caller.groups.clone()),
            extra: Some(caller.extra.clone()).filter(|e| !e.is_empty()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(hvx_api::GROUP.to_string()),
                resource: Some("overlaydisks".into()),
                subresource: Some("upload".into()),
                verb: Some(verb.into()),
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn expire<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, at: impl Fn(&V) -> Instant) {
    // Bounded by the callers seen within one TTL.
    map.retain(|_, v| at(v).elapsed() < CACHE_TTL);
}

impl Access for KubeAccess {
    async fn authenticate(&self, token: &str) -> Result<Caller, Denied> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        {
            let mut cache = self.callers.lock().unwrap_or_else(|p| p.into_inner());
            expire(&mut cache, |(_, at)| *at);
            if let Some((caller, _)) = cache.get(&key) {
                return Ok(caller.clone());
            }
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| Denied::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Denied::Unauthenticated(format!(
                "the API server does not accept this token{}",
                status.error.map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        let user = status.user.unwrap_or_default();
        let caller = Caller {
            username: user.username.unwrap_or_default(),
            uid: user.uid.unwrap_or_default(),
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default(),
        };
        self.callers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (caller.clone(), Instant::now()));
        Ok(caller)
    }

    async fn authorize(
        &self,
        caller: &Caller,
        verb: &str,
        ns: &str,
        name: &str,
    ) -> Result<(), Denied> {
        use k8s_openapi::api::authorization::v1::SubjectAccessReview;
        let key = (
            caller.username.clone(),
            caller.uid.clone(),
            verb.to_string(),
            ns.to_string(),
            name.to_string(),
        );
        {
            let mut cache = self.grants.lock().unwrap_or_else(|p| p.into_inner());
            expire(&mut cache, |at| *at);
            if cache.contains_key(&key) {
                return Ok(());
            }
        }
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answer = api
            .create(
                &kube::api::PostParams::default(),
                &access_review(caller, verb, ns, name),
            )
            .await
            .map_err(|e| Denied::Unavailable(format!("SubjectAccessReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if !status.allowed {
            return Err(Denied::Forbidden(forbidden_text(caller, verb, ns, name)));
        }
        self.grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Instant::now());
        Ok(())
    }
}

/// The 403 text (pure; also what test tables answer).
pub fn forbidden_text(caller: &Caller, verb: &str, ns: &str, name: &str) -> String {
    format!(
        "{} may not {verb} overlaydisks/upload {name} in namespace {ns} \
         (namespace edit/admin grant it; see the hvx chart's aggregated roles)",
        caller.username
    )
}

/// The caller's bearer token: `Authorization`, else the proxy header.
pub fn bearer_token(headers: &hyper::HeaderMap) -> Option<&str> {
    [hyper::header::AUTHORIZATION.as_str(), PROXY_AUTH_HEADER]
        .iter()
        .find_map(|h| {
            headers
                .get(*h)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
        })
}

/// HMAC-SHA256 of `msg` under `key`, hex (RFC 2104; the per-upload fetch key).
pub fn hmac_hex(key: &[u8], msg: &[u8]) -> String {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    outer.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares without an early exit (the key is a secret).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The fetch secret kept beside the uploads (`<dir>/.fetch-secret`), created from
/// the kernel's random source on first use: it lives exactly as long as the uploads
/// it protects (the emptyDir), across operator restarts in the same pod.
pub fn load_or_create_fetch_secret(dir: &Path) -> Result<FetchSecret, Error> {
    let fail = |reason: String| Error::Build {
        object: dir.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| fail(format!("creating the upload directory: {e}")))?;
    let path = dir.join(".fetch-secret");
    match std::fs::read(&path) {
        Ok(b) if b.len() == 32 => return Ok(FetchSecret(b)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(format!("reading {}: {e}", path.display()))),
    }
    let mut b = vec![0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom")
            .map_err(|e| fail(format!("opening /dev/urandom: {e}")))?,
        &mut b,
    )
    .map_err(|e| fail(format!("reading /dev/urandom: {e}")))?;
    let tmp = dir.join(".fetch-secret.tmp");
    std::fs::write(&tmp, &b)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| fail(format!("writing {}: {e}", path.display())))?;
    Ok(FetchSecret(b))
}

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
pub struct Server<D, A> {
    settings: UploadSettings,
    disks: D,
    access: A,
    /// One writer per disk at a time; last progress report per disk.
    state: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Instant>>>>,
    /// Declared totals of the uploads in progress, by UID: the space they will take.
    totals: Mutex<HashMap<String, u64>>,
}

/// Bytes the upload store may still take for `uid`'s upload of `total` bytes (pure):
/// `stored` lists every stored file (uid, bytes, complete); an upload in progress
/// counts at its declared total when known (`totals`), so concurrent uploads cannot
/// together overrun the store.
pub fn store_room(
    capacity: u64,
    stored: &[(String, u64, bool)],
    totals: &HashMap<String, u64>,
    uid: &str,
) -> u64 {
    let committed: u64 = stored
        .iter()
        .filter(|(u, _, _)| u != uid)
        .map(|(u, n, complete)| {
            if *complete {
                *n
            } else {
                totals.get(u).copied().unwrap_or(*n).max(*n)
            }
        })
        .sum();
    capacity.saturating_sub(committed)
}

impl<D: Disks, A: Access> Server<D, A> {
    /// A server storing into `settings.dir` (created).
    pub fn new(settings: UploadSettings, disks: D, access: A) -> Result<Self, Error> {
        std::fs::create_dir_all(&settings.dir).map_err(|e| Error::Build {
            object: settings.dir.display().to_string(),
            reason: format!("creating the upload directory: {e}"),
        })?;
        Ok(Self {
            settings,
            disks,
            access,
            state: Mutex::default(),
            totals: Mutex::default(),
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
            self.totals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(uid);
        }
    }

    /// Every stored upload: (uid, bytes, complete).
    fn stored(&self) -> Vec<(String, u64, bool)> {
        let Ok(dir) = std::fs::read_dir(&self.settings.dir) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let len = e.metadata().ok()?.len();
                if let Some(uid) = name.strip_suffix(".complete") {
                    Some((uid.to_string(), len, true))
                } else {
                    name.strip_suffix(".part")
                        .map(|uid| (uid.to_string(), len, false))
                }
            })
            .collect()
    }

    /// Refuses an upload of `total` bytes (`offset` stored) the store has no room
    /// for: the configured capacity (the emptyDir's sizeLimit, past which the kubelet
    /// evicts the operator) minus what other uploads hold or will hold, and the free
    /// space of the filesystem.
    fn check_room(&self, uid: &str, offset: u64, total: u64) -> Result<(), (StatusCode, String)> {
        if total > self.settings.max_bytes {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{total} bytes is over this server's limit of {} bytes (chart value upload.maxBytes)",
                    self.settings.max_bytes
                ),
            ));
        }
        let room = {
            let totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
            store_room(self.settings.capacity_bytes, &self.stored(), &totals, uid)
        };
        if total > room {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{total} bytes do not fit: the upload store holds {} bytes and room for {room} more \
                     (chart value upload.sizeLimit; uploads leave it when their OverlayDisk is deleted)",
                    self.settings.capacity_bytes
                ),
            ));
        }
        if let Ok(fs) = rustix::fs::statvfs(&self.settings.dir) {
            let free = fs.f_bavail.saturating_mul(fs.f_frsize);
            let needed = total - offset.min(total);
            if needed > free {
                return Err((
                    StatusCode::INSUFFICIENT_STORAGE,
                    format!(
                        "{needed} more bytes do not fit: the upload store's filesystem has {free} bytes free"
                    ),
                ));
            }
        }
        Ok(())
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

    /// Authenticates and authorizes `verb` on the upload of `ns/name`.
    async fn admit(
        &self,
        req: &Request<Incoming>,
        verb: &str,
        ns: &str,
        name: &str,
    ) -> Result<Caller, (StatusCode, String)> {
        let refuse = |d: Denied| match d {
            Denied::Unauthenticated(m) => (StatusCode::UNAUTHORIZED, m),
            Denied::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            Denied::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
        };
        let Some(token) = bearer_token(req.headers()) else {
            return Err((
                StatusCode::UNAUTHORIZED,
                "send your Kubernetes bearer token (Authorization: Bearer, or \
                 X-Hvx-Upload-Authorization: Bearer through the API server's service proxy)"
                    .to_string(),
            ));
        };
        let caller = self.access.authenticate(token).await.map_err(refuse)?;
        self.access
            .authorize(&caller, verb, ns, name)
            .await
            .map_err(refuse)?;
        Ok(caller)
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(route) = route(req.uri().path()) else {
            return text(StatusCode::NOT_FOUND, "no such endpoint");
        };
        match (route, req.method().clone()) {
            (Route::Health, Method::GET) => text(StatusCode::OK, "ok"),
            (Route::Fetch { uid }, Method::GET) => {
                let key = req
                    .uri()
                    .query()
                    .unwrap_or_default()
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("key="))
                    .unwrap_or_default();
                if !same(key, &fetch_key(&self.settings, &uid)) {
                    return text(
                        StatusCode::FORBIDDEN,
                        "a completed upload is fetched with the key the operator gives its agent",
                    );
                }
                self.fetch(&uid).await
            }
            (Route::Upload { ns, name }, m) if m == Method::HEAD || m == Method::PUT => {
                let verb = if m == Method::PUT { "create" } else { "get" };
                // Before the disk is looked up: a caller learns nothing about disks
                // it may not upload to, not even whether they exist.
                let caller = match self.admit(&req, verb, &ns, &name).await {
                    Ok(c) => c,
                    Err((code, reason)) => return text(code, reason),
                };
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
                tracing::debug!(user = %caller.username, disk = %format!("{ns}/{name}"), "upload chunk");
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
        if let Err((code, reason)) = self.check_room(&target.uid, offset, range.total) {
            return text(code, reason);
        }
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(target.uid.clone(), range.total);
        let part = self.part(&target.uid);
        let written = match self.append(&part, offset, len, req.into_body()).await {
            Ok(n) => n,
            Err((code, msg)) => return with_offset(code, offset, &msg),
        };
        let now = offset + written;
        if now == range.total {
            self.totals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&target.uid);
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

/// The key that fetches the completed upload `uid` (pure).
pub fn fetch_key(settings: &UploadSettings, uid: &str) -> String {
    hmac_hex(&settings.fetch_secret.0, uid.as_bytes())
}

/// The in-cluster URL agents import a completed upload from (with its key).
pub fn fetch_url(settings: &UploadSettings, uid: &str) -> String {
    format!(
        "{}/v1alpha1/uploads/{uid}?key={}",
        settings.internal_url.trim_end_matches('/'),
        fetch_key(settings, uid)
    )
}

/// Serves on `listener` until the task is dropped.
pub async fn serve<D: Disks, A: Access>(
    listener: tokio::net::TcpListener,
    server: Arc<Server<D, A>>,
) {
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
#[allow(clippy::unwrap_used, clippy::expect_used)]
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

    #[test]
    fn hmac_matches_rfc4231() {
        // RFC 4231 test case 2.
        assert_eq!(
            hmac_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
    }

    #[test]
    fn tokens_come_from_either_header() {
        let mut h = hyper::HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert(PROXY_AUTH_HEADER, "Bearer t1".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("t1"));
        h.insert("authorization", "Bearer t2".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("t2"));
        h.insert("authorization", "Basic eDp5".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("t1"));
        h.insert(PROXY_AUTH_HEADER, "Bearer ".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
    }

    #[test]
    fn access_review_names_the_upload_subresource() {
        let caller = Caller {
            username: "system:serviceaccount:prod:ci".into(),
            uid: "u-1".into(),
            groups: vec!["system:serviceaccounts".into()],
            extra: BTreeMap::new(),
        };
        let r = access_review(&caller, "create", "prod", "web-root");
        let a = r.spec.resource_attributes.unwrap();
        assert_eq!(a.group.as_deref(), Some("hvx.dev"));
        assert_eq!(a.resource.as_deref(), Some("overlaydisks"));
        assert_eq!(a.subresource.as_deref(), Some("upload"));
        assert_eq!(a.verb.as_deref(), Some("create"));
        assert_eq!(a.namespace.as_deref(), Some("prod"));
        assert_eq!(a.name.as_deref(), Some("web-root"));
        assert_eq!(
            r.spec.user.as_deref(),
            Some("system:serviceaccount:prod:ci")
        );
        assert_eq!(r.spec.extra, None);
    }

    #[test]
    fn store_room_counts_uploads_in_progress_at_their_declared_size() {
        let stored = vec![
            ("done".to_string(), 30, true),
            ("going".to_string(), 5, false),
            ("me".to_string(), 7, false),
            ("orphan".to_string(), 4, false),
        ];
        let mut totals = HashMap::new();
        totals.insert("going".to_string(), 40);
        // 100 - 30 - 40 - 4: "me" does not count against itself.
        assert_eq!(store_room(100, &stored, &totals, "me"), 26);
        assert_eq!(store_room(50, &stored, &totals, "me"), 0);
    }
}
