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
//! Positive answers are cached for `CACHE_TTL`.
//!
//! The bytes never stay here: each PUT is streamed as it arrives to the agents of
//! two nodes (PutUpload; one when the cluster has one node), which append it to
//! `uploads/<disk uid>.part` in their stores, and the chunk is acknowledged to the
//! user only once both answered with the bytes fsynced. The two nodes are chosen from
//! the disk's UID (rendezvous hashing over the ready agents with room; nodes already
//! holding part of it first), so a restarted or moved operator picks the same ones,
//! and HEAD asks them (GetUpload: the smallest offset of the copies), so nothing is
//! lost with the operator pod. The last byte completes both copies (hashed, renamed).
//! The endpoint records progress in memory (`UploadBook`) and wakes the disk's
//! reconcile, the one writer of the OverlayDisk's status. The node that runs a VM
//! imports the disk from its own copy, or gets the base from a node that has it
//! (`hostprep`: bases travel by digest).

use crate::error::Error;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hvx_api::OverlayDisk;
use hvx_proto::v1 as pb;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use kube::api::Api;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes per PutUpload message (well under gRPC's 4 MiB message limit).
pub const MESSAGE_BYTES: usize = 1 << 20;
/// Copies of every upload, on different nodes (fewer when the cluster has fewer).
pub const COPIES: usize = 2;

/// Largest chunk one PUT may carry.
pub const MAX_CHUNK: u64 = 64 << 20;

/// How long a positive TokenReview or SubjectAccessReview answer is reused: short,
/// so a revoked binding or token stops working within seconds, long enough that an
/// upload's 8 MiB chunks do not each cost two API calls.
pub const CACHE_TTL: Duration = Duration::from_secs(10);

/// The header carrying the caller's token through the API server's service proxy.
pub const PROXY_AUTH_HEADER: &str = "x-hvx-upload-authorization";

pub use hvx_operator_core::context::{UploadBook, UploadProgress, UploadSettings};

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

/// An OverlayDisk that takes uploads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadTarget {
    /// Its UID (the name of the upload in the agents' stores).
    pub uid: String,
    /// Declared size, if any.
    pub size_bytes: Option<u64>,
}

/// How the server finds disks (the cluster, or a map in tests).
pub trait Disks: Send + Sync + 'static {
    /// The upload target `ns/name`, or why there is none (404 text).
    fn target(
        &self,
        ns: &str,
        name: &str,
    ) -> impl std::future::Future<Output = Result<UploadTarget, String>> + Send;
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
}

/// Why an agent call failed: its gRPC code and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyError {
    /// gRPC code (UNAVAILABLE when the node could not be reached).
    pub code: tonic::Code,
    /// The agent's message.
    pub message: String,
}

impl From<Error> for CopyError {
    fn from(e: Error) -> Self {
        CopyError {
            code: e.code().unwrap_or(tonic::Code::Unavailable),
            message: e.to_string(),
        }
    }
}

/// Where upload copies live: the node agents (PutUpload, GetUpload), or agents on
/// loopback in tests.
pub trait Copies: Send + Sync + 'static {
    /// The nodes with a ready agent now.
    fn nodes(&self) -> impl std::future::Future<Output = Vec<String>> + Send;
    /// What `node` holds of `uid`'s upload.
    fn get(
        &self,
        node: &str,
        uid: &str,
    ) -> impl std::future::Future<Output = Result<pb::UploadState, CopyError>> + Send;
    /// Streams `chunks` to `node`; its answer once they are durable.
    fn put(
        &self,
        node: &str,
        chunks: tokio::sync::mpsc::Receiver<pb::UploadChunk>,
    ) -> impl std::future::Future<Output = Result<pb::UploadState, CopyError>> + Send;
}

/// The cluster's node agents: the ready ones from the Node list (cached a few
/// seconds: every chunk asks), reached with the operator's agent clients.
pub struct AgentCopies {
    client: kube::Client,
    pool: crate::agents::AgentPool,
    metrics: Arc<crate::metrics::Metrics>,
    nodes: tokio::sync::Mutex<(Option<Instant>, BTreeMap<String, String>)>,
}

impl std::fmt::Debug for AgentCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentCopies")
    }
}

/// How long the list of ready agent nodes is reused.
const NODES_TTL: Duration = Duration::from_secs(5);

impl AgentCopies {
    /// Agents reached with `settings`, found through `client`.
    pub fn new(
        client: kube::Client,
        settings: crate::agents::AgentSettings,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            client,
            pool: crate::agents::AgentPool::new(settings),
            metrics,
            nodes: tokio::sync::Mutex::new((None, BTreeMap::new())),
        }
    }

    async fn ready(&self) -> BTreeMap<String, String> {
        let mut cached = self.nodes.lock().await;
        if cached.0.is_some_and(|at| at.elapsed() < NODES_TTL) {
            return cached.1.clone();
        }
        let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        let lp = kube::api::ListParams::default()
            .labels(&format!("{}=ready", hvx_api::labels::NODE_LABEL_AGENT));
        match api.list(&lp).await {
            Ok(list) => {
                cached.1 = list
                    .items
                    .iter()
                    .filter_map(|n| {
                        Some((n.metadata.name.clone()?, crate::stores::internal_ip(n)?))
                    })
                    .collect();
                cached.0 = Some(Instant::now());
            }
            Err(e) => tracing::warn!(error = %e, "listing agent nodes for an upload"),
        }
        cached.1.clone()
    }

    async fn agent(&self, node: &str) -> Result<crate::agents::AgentClient, CopyError> {
        let ip = self
            .ready()
            .await
            .get(node)
            .cloned()
            .ok_or_else(|| CopyError {
                code: tonic::Code::Unavailable,
                message: format!("node {node} has no ready agent"),
            })?;
        Ok(self.pool.client(node, &ip, &self.metrics)?)
    }
}

impl Copies for AgentCopies {
    async fn nodes(&self) -> Vec<String> {
        self.ready().await.into_keys().collect()
    }

    async fn get(&self, node: &str, uid: &str) -> Result<pb::UploadState, CopyError> {
        let agent = self.agent(node).await?;
        Ok(agent
            .get_upload(pb::GetUploadRequest {
                disk_uid: uid.to_string(),
            })
            .await?)
    }

    async fn put(
        &self,
        node: &str,
        chunks: tokio::sync::mpsc::Receiver<pb::UploadChunk>,
    ) -> Result<pb::UploadState, CopyError> {
        let agent = self.agent(node).await?;
        Ok(agent
            .put_upload(tokio_stream::wrappers::ReceiverStream::new(chunks))
            .await?)
    }
}

/// Rendezvous rank of `node` for upload `uid` (pure): every operator computes the
/// same order, and a node joining or leaving moves only the uploads it wins or held.
fn rank(uid: &str, node: &str) -> [u8; 32] {
    Sha256::new()
        .chain_update(uid.as_bytes())
        .chain_update([0])
        .chain_update(node.as_bytes())
        .finalize()
        .into()
}

/// The nodes that keep `uid`'s upload of `total` bytes (pure), from what every ready
/// node answered (`states`; unreachable nodes left out): nodes that already hold
/// part of it first (most bytes first), then by rendezvous rank among the nodes with
/// room for all of it, up to `COPIES` (or as many nodes as there are). `None` when
/// not enough nodes have room.
pub fn choose_copies(
    uid: &str,
    states: &[(String, pb::UploadState)],
    total: u64,
) -> Option<Vec<String>> {
    let want = COPIES.min(states.len()).max(1);
    let mut holders: Vec<&(String, pb::UploadState)> = states
        .iter()
        .filter(|(_, s)| s.offset > 0 || s.complete)
        .collect();
    holders.sort_by(|(a, sa), (b, sb)| {
        (sb.complete, sb.offset)
            .cmp(&(sa.complete, sa.offset))
            .then_with(|| rank(uid, a).cmp(&rank(uid, b)))
    });
    let mut chosen: Vec<String> = holders.iter().take(want).map(|(n, _)| n.clone()).collect();
    let mut fresh: Vec<&(String, pb::UploadState)> = states
        .iter()
        .filter(|(n, s)| {
            !chosen.contains(n) && s.offset == 0 && !s.complete && s.room_bytes >= total
        })
        .collect();
    fresh.sort_by_key(|(n, _)| rank(uid, n));
    for (n, _) in fresh {
        if chosen.len() >= want {
            break;
        }
        chosen.push(n.clone());
    }
    (chosen.len() >= want).then_some(chosen)
}

/// What the copies hold together (pure): the smallest offset (what every copy has),
/// complete when every copy is, the nodes.
pub fn progress_of(copies: &[(String, pb::UploadState)], total: u64) -> UploadProgress {
    let complete = !copies.is_empty() && copies.iter().all(|(_, s)| s.complete);
    UploadProgress {
        bytes_done: copies.iter().map(|(_, s)| s.offset).min().unwrap_or(0),
        bytes_total: total,
        complete,
        nodes: copies.iter().map(|(n, _)| n.clone()).collect(),
        sha256: if complete {
            copies
                .first()
                .map(|(_, s)| s.sha256.clone())
                .unwrap_or_default()
        } else {
            String::new()
        },
    }
}

/// What the ready agents hold of `uid`'s upload, however this process learned of
/// it (pure): `None` when no node holds any of it. The copies are the holders with
/// the most bytes (complete ones first), at most `COPIES`.
pub fn holders_progress(uid: &str, states: &[(String, pb::UploadState)]) -> Option<UploadProgress> {
    let holders: Vec<(String, pb::UploadState)> = states
        .iter()
        .filter(|(_, s)| s.offset > 0 || s.complete)
        .cloned()
        .collect();
    let total = holders.iter().map(|(_, s)| s.total).max()?;
    let chosen = choose_copies(uid, &holders, total).unwrap_or_default();
    let copies: Vec<(String, pb::UploadState)> = holders
        .into_iter()
        .filter(|(n, _)| chosen.contains(n))
        .collect();
    // Complete wherever one copy is complete: the node that runs a VM imports it
    // from there (a second copy still short of the end changes nothing).
    let complete: Vec<(String, pb::UploadState)> =
        copies.iter().filter(|(_, s)| s.complete).cloned().collect();
    Some(if complete.is_empty() {
        progress_of(&copies, total)
    } else {
        progress_of(&complete, total)
    })
}

/// What the nodes hold of `uid`'s upload, for the controllers: the endpoint's record
/// when it says complete, else every ready agent's answer (an operator that restarted,
/// or another replica served the upload), which is then recorded.
pub async fn progress(ctx: &crate::Context, uid: &str) -> Option<UploadProgress> {
    let book = ctx.config.upload.as_ref().map(|u| &u.book);
    if let Some(p) = book.and_then(|b| b.get(uid)).filter(|p| p.complete) {
        return Some(p);
    }
    let nodes = ctx.stores.agent_nodes();
    let answers = futures::future::join_all(nodes.iter().map(|(node, ip)| async move {
        let agent = ctx.agents.client(node, ip, &ctx.metrics).ok()?;
        let state = agent
            .get_upload(pb::GetUploadRequest {
                disk_uid: uid.to_string(),
            })
            .await
            .ok()?;
        Some((node.clone(), state))
    }))
    .await;
    let states: Vec<(String, pb::UploadState)> = answers.into_iter().flatten().collect();
    let p = holders_progress(uid, &states)?;
    if let Some(b) = book {
        b.learn(uid, p.clone());
    }
    Some(p)
}

/// How often an upload in progress wakes its disk's reconcile (status writes).
const WAKE_EVERY: Duration = Duration::from_secs(2);

/// Asks every ready agent what it holds of `uid` (unreachable ones left out).
pub async fn states<C: Copies>(copies: &C, uid: &str) -> Vec<(String, pb::UploadState)> {
    let nodes = copies.nodes().await;
    let answers = futures::future::join_all(nodes.iter().map(|n| copies.get(n, uid))).await;
    nodes
        .into_iter()
        .zip(answers)
        .filter_map(|(n, a)| match a {
            Ok(s) => Some((n, s)),
            Err(e) => {
                tracing::debug!(node = %n, error = %e.message, "GetUpload");
                None
            }
        })
        .collect()
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
    /// Liveness.
    Health,
}

/// Maps a path to a route (names validated: they become API calls).
pub fn route(path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match parts.as_slice() {
        ["", "healthz"] => Some(Route::Health),
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

/// The HTTP answer for a copy that failed (pure): the node's own refusals keep their
/// meaning (507 full, 409 offset, 400 bad request), anything else is worth a retry.
pub fn copy_failure(node: &str, e: &CopyError) -> (StatusCode, String) {
    let code = match e.code {
        tonic::Code::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
        tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, format!("node {node}: {}", e.message))
}

/// The upload server.
#[derive(Debug)]
pub struct Server<D, A, C> {
    settings: UploadSettings,
    disks: D,
    access: A,
    copies: C,
    /// One writer per disk at a time; when it last woke the disk's reconcile.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Instant>>>>>,
}

impl<D: Disks, A: Access, C: Copies> Server<D, A, C> {
    /// A server keeping uploads on `copies`.
    pub fn new(settings: UploadSettings, disks: D, access: A, copies: C) -> Self {
        Self {
            settings,
            disks,
            access,
            copies,
            locks: Mutex::default(),
        }
    }

    fn lock_of(&self, uid: &str) -> Arc<tokio::sync::Mutex<Option<Instant>>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(uid.to_string())
            .or_default()
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

    /// The copies of `uid`'s upload of `total` bytes (`None`: not known yet, HEAD
    /// before any PUT) with what each holds, or the answer why there are none.
    async fn copies_of(
        &self,
        uid: &str,
        total: Option<u64>,
    ) -> Result<Vec<(String, pb::UploadState)>, (StatusCode, String)> {
        let states = states(&self.copies, uid).await;
        if states.is_empty() {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "no node agent answers: uploads are kept on the nodes".into(),
            ));
        }
        let total = match total {
            Some(t) => t,
            // HEAD: the holders decide; nothing held is offset 0.
            None => match states.iter().map(|(_, s)| s.total).max() {
                Some(t) if t > 0 => t,
                _ => return Ok(Vec::new()),
            },
        };
        let Some(chosen) = choose_copies(uid, &states, total) else {
            return Err((
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "{total} bytes fit on fewer than {} nodes (each upload is kept on {} nodes; \
                     uploads leave the nodes when their OverlayDisk is deleted)",
                    COPIES.min(states.len()),
                    COPIES.min(states.len())
                ),
            ));
        };
        Ok(states
            .into_iter()
            .filter(|(n, _)| chosen.contains(n))
            .collect())
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(route) = route(req.uri().path()) else {
            return text(StatusCode::NOT_FOUND, "no such endpoint");
        };
        match (route, req.method().clone()) {
            (Route::Health, Method::GET) => text(StatusCode::OK, "ok"),
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
                    let copies = match self.copies_of(&target.uid, None).await {
                        Ok(c) => c,
                        Err((code, reason)) => return text(code, reason),
                    };
                    let offset = copies.iter().map(|(_, s)| s.offset).min().unwrap_or(0);
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
        if range.total > self.settings.max_bytes {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{} bytes is over this server's limit of {} bytes (chart value upload.maxBytes)",
                    range.total, self.settings.max_bytes
                ),
            );
        }
        let uid = target.uid.clone();
        let lock = self.lock_of(&uid);
        let mut last_wake = lock.lock().await;
        let copies = match self.copies_of(&uid, Some(range.total)).await {
            Ok(c) => c,
            Err((code, reason)) => return text(code, reason),
        };
        let now = progress_of(&copies, range.total);
        if now.complete {
            let same = copies.iter().all(|(_, s)| s.total == range.total);
            return if same {
                with_offset(StatusCode::OK, now.bytes_done, "already complete")
            } else {
                with_offset(
                    StatusCode::CONFLICT,
                    now.bytes_done,
                    "a different upload is complete",
                )
            };
        }
        if let Some((node, s)) = copies
            .iter()
            .find(|(_, s)| s.total != 0 && s.total != range.total)
        {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "this upload was started with a total of {} bytes (node {node}), not {}",
                    s.total, range.total
                ),
            );
        }
        if range.start != now.bytes_done {
            return with_offset(
                StatusCode::CONFLICT,
                now.bytes_done,
                "the server holds a different offset",
            );
        }
        let answers = relay(&self.copies, &uid, &copies, range, len, req.into_body()).await;
        let (states, failure) = match answers {
            Ok(states) => (states, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        if let Some((code, reason)) = failure {
            // What the copies hold now decides where the user resumes.
            let after = self
                .copies_of(&uid, Some(range.total))
                .await
                .unwrap_or_default();
            let offset = after
                .iter()
                .map(|(_, s)| s.offset)
                .min()
                .unwrap_or(range.start);
            return with_offset(code, offset, &reason);
        }
        let done = progress_of(&states, range.total);
        if done.complete {
            let sums: std::collections::BTreeSet<&str> =
                states.iter().map(|(_, s)| s.sha256.as_str()).collect();
            if sums.len() > 1 {
                return with_offset(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    done.bytes_done,
                    "the copies of this upload differ: delete the OverlayDisk and upload again",
                );
            }
            tracing::info!(disk = %format!("{ns}/{name}"), bytes = done.bytes_done, nodes = ?done.nodes, "upload complete");
        }
        let offset = done.bytes_done;
        // The reconcile writes the status: woken at the end and every few seconds.
        if done.complete || last_wake.is_none_or(|at| at.elapsed() >= WAKE_EVERY) {
            *last_wake = Some(Instant::now());
            self.settings.book.record(ns, name, &uid, done);
        } else {
            self.settings.book.learn(&uid, done);
        }
        with_offset(StatusCode::NO_CONTENT, offset, "")
    }
}

/// Streams the body (`len` bytes at `range.start`) to every copy, each from the
/// offset it holds (a copy ahead of the others skips what it has), and waits for
/// every answer: the bytes are acknowledged only once all copies hold them. A body
/// that is not exactly `len` bytes cancels the calls, so the agents cut back.
async fn relay<C: Copies>(
    copies: &C,
    uid: &str,
    targets: &[(String, pb::UploadState)],
    range: ContentRange,
    len: u64,
    mut body: Incoming,
) -> Result<Vec<(String, pb::UploadState)>, (StatusCode, String)> {
    let mut senders = Vec::new();
    let mut calls = Vec::new();
    for (node, state) in targets {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadChunk>(4);
        senders.push((node.clone(), state.offset, Some(tx)));
        calls.push(async move { (node.clone(), copies.put(node, rx).await) });
    }
    let mut calls: futures::stream::FuturesUnordered<_> = calls.into_iter().collect();
    let feed = async {
        let mut at = range.start;
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| (StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if at + data.len() as u64 > range.start + len {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "the body is longer than Content-Range says".to_string(),
                ));
            }
            for piece in data.chunks(MESSAGE_BYTES) {
                let end = at + piece.len() as u64;
                for (_, held, tx) in senders.iter_mut() {
                    if end <= *held {
                        continue;
                    }
                    let skip = usize::try_from(held.saturating_sub(at)).unwrap_or(0);
                    let msg = pb::UploadChunk {
                        disk_uid: uid.to_string(),
                        offset: at.max(*held),
                        total: range.total,
                        data: piece[skip.min(piece.len())..].to_vec(),
                    };
                    if let Some(t) = tx
                        && t.send(msg).await.is_err()
                    {
                        // The call ended early: its answer says why.
                        *tx = None;
                    }
                }
                at = end;
            }
        }
        if at != range.start + len {
            return Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "the body has {} bytes, Content-Range says {len}",
                    at - range.start
                ),
            ));
        }
        // Ends the streams: the agents sync and answer.
        senders.clear();
        Ok(())
    };
    use futures::StreamExt;
    // The calls run while the body is fed; an answer before the end is a failure.
    let mut early: Vec<(String, Result<pb::UploadState, CopyError>)> = Vec::new();
    let fed = {
        tokio::pin!(feed);
        loop {
            tokio::select! {
                r = &mut feed => break r,
                Some(answer) = calls.next() => early.push(answer),
            }
        }
    };
    if let Err(e) = fed {
        // Dropping the calls cancels them: the agents cut back to where they were.
        drop(calls);
        return Err(e);
    }
    let mut answers = early;
    while let Some(a) = calls.next().await {
        answers.push(a);
    }
    let mut out = Vec::new();
    for (node, a) in answers {
        match a {
            Ok(s) => out.push((node, s)),
            Err(e) => return Err(copy_failure(&node, &e)),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Serves on `listener` until the task is dropped.
pub async fn serve<D: Disks, A: Access, C: Copies>(
    listener: tokio::net::TcpListener,
    server: Arc<Server<D, A, C>>,
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
        // Completed uploads are no longer served from here (they stay on the nodes).
        assert_eq!(route("/v1alpha1/uploads/0b1c-2d"), None);
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

    fn state(offset: u64, total: u64, complete: bool, room: u64) -> pb::UploadState {
        pb::UploadState {
            offset,
            total,
            complete,
            sha256: if complete { "ab".into() } else { String::new() },
            room_bytes: room,
        }
    }

    #[test]
    fn copies_are_chosen_from_the_uid_holders_first_and_only_with_room() {
        let nodes = |room: u64| -> Vec<(String, pb::UploadState)> {
            ["n1", "n2", "n3"]
                .iter()
                .map(|n| (n.to_string(), state(0, 0, false, room)))
                .collect()
        };
        // Deterministic: the same two every time, for the same UID.
        let a = choose_copies("uid-a", &nodes(100), 50).unwrap();
        assert_eq!(a.len(), 2);
        assert_ne!(a[0], a[1]);
        assert_eq!(choose_copies("uid-a", &nodes(100), 50).unwrap(), a);
        // Listed in another order: the same choice.
        let mut reversed = nodes(100);
        reversed.reverse();
        assert_eq!(choose_copies("uid-a", &reversed, 50).unwrap(), a);
        // Different UIDs spread over the nodes.
        let firsts: std::collections::BTreeSet<String> = (0..20)
            .map(|i| choose_copies(&format!("uid-{i}"), &nodes(100), 50).unwrap()[0].clone())
            .collect();
        assert!(firsts.len() > 1, "{firsts:?}");
        // Holders win over rank, most bytes first.
        let mut s = nodes(100);
        s[2].1 = state(30, 50, false, 100);
        s[1].1 = state(10, 50, false, 100);
        assert_eq!(choose_copies("uid-a", &s, 50).unwrap(), ["n3", "n2"]);
        // Nodes without room for the whole upload are not chosen; too few: none.
        let mut s = nodes(10);
        s[0].1.room_bytes = 100;
        assert_eq!(choose_copies("uid-a", &s, 50), None);
        s[1].1.room_bytes = 100;
        assert_eq!(choose_copies("uid-a", &s, 50).unwrap().len(), 2);
        // One node: one copy.
        assert_eq!(
            choose_copies("uid-a", &nodes(100)[..1], 50).unwrap(),
            ["n1"]
        );
    }

    #[test]
    fn progress_is_what_every_copy_holds() {
        let copies = vec![
            ("n1".to_string(), state(40, 100, false, 0)),
            ("n2".to_string(), state(30, 100, false, 0)),
        ];
        let p = progress_of(&copies, 100);
        assert_eq!((p.bytes_done, p.bytes_total, p.complete), (30, 100, false));
        assert_eq!(p.nodes, ["n1", "n2"]);
        let done = vec![
            ("n1".to_string(), state(100, 100, true, 0)),
            ("n2".to_string(), state(100, 100, true, 0)),
        ];
        let p = progress_of(&done, 100);
        assert!(p.complete);
        assert_eq!(p.sha256, "ab");
        // A restarted operator: the holders among every node's answer.
        let all = vec![
            ("n1".to_string(), state(100, 100, true, 0)),
            ("n2".to_string(), state(70, 100, false, 0)),
            ("n3".to_string(), state(0, 0, false, 500)),
        ];
        let p = holders_progress("uid-a", &all).unwrap();
        assert!(p.complete);
        assert_eq!(p.nodes, ["n1"]);
        assert_eq!(holders_progress("uid-a", &all[2..]), None);
        let partial = holders_progress("uid-a", &all[1..]).unwrap();
        assert_eq!((partial.bytes_done, partial.complete), (70, false));
    }

    #[test]
    fn copy_failures_keep_their_meaning() {
        let e = |code| CopyError {
            code,
            message: "m".into(),
        };
        assert_eq!(
            copy_failure("n1", &e(tonic::Code::ResourceExhausted)).0,
            StatusCode::INSUFFICIENT_STORAGE
        );
        assert_eq!(
            copy_failure("n1", &e(tonic::Code::FailedPrecondition)).0,
            StatusCode::CONFLICT
        );
        assert_eq!(
            copy_failure("n1", &e(tonic::Code::Unavailable)).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(
            copy_failure("n1", &e(tonic::Code::Internal))
                .1
                .contains("n1")
        );
    }
}
