//! gRPC clients of the node agents: one lazily connected channel per node, dialled at
//! the node's InternalIP (agents use the host network) over mutual TLS. The operator
//! presents its client-only identity and requires the agent's certificate to name the
//! node it dialled (`<node>.agent.hvx`); when its identity is renewed, channels are
//! rebuilt on next use (calls in flight finish on the old one).
//!
//! [`Agent`] is the one way the operator calls an agent: one method per RPC, with the
//! deadline, the retries of the transient codes agent.proto names (unary calls only: a
//! stream cannot be replayed), the per-call metrics and the tracing in one place, and
//! failures kept typed ([`Error::Agent`] carries the gRPC code).

use crate::error::Error;
use crate::metrics::Metrics;
use hvx_proto::v1 as pb;
use hvx_proto::v1::node_agent_client::NodeAgentClient;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

/// A connected agent client (the name callers use).
pub type AgentClient = Agent;

/// How the operator reaches agents.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    /// Agent gRPC port on every node.
    pub port: u16,
    /// The operator's client identity and the CA agents chain to (renewed in place);
    /// `None` = plaintext (development only).
    pub tls: Option<Arc<hvx_identity::ca::OperatorCredentials>>,
    /// Per-call deadline for unary calls (and for a stream's first answer).
    pub timeout: Duration,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            port: hvx_api::node::AGENT_PORT,
            tls: None,
            timeout: Duration::from_secs(crate::defaults::AGENT_TIMEOUT_SECONDS),
        }
    }
}

/// Channels by node, rebuilt when a node's address or the operator's identity changes.
#[derive(Debug, Default)]
pub struct AgentPool {
    settings: AgentSettings,
    /// node -> (address, identity generation, channel)
    channels: Mutex<BTreeMap<String, (String, u64, Channel)>>,
}

impl AgentPool {
    /// A pool with these settings.
    pub fn new(settings: AgentSettings) -> Self {
        Self {
            settings,
            channels: Mutex::default(),
        }
    }

    /// The TLS configuration for dialling `node`'s agent and the identity generation
    /// it was made from.
    fn tls(&self, node: &str) -> Option<(u64, ClientTlsConfig)> {
        let creds = self.settings.tls.as_ref()?.current();
        Some((
            creds.generation,
            ClientTlsConfig::new()
                .domain_name(hvx_identity::agent_server_name(node))
                .ca_certificate(Certificate::from_pem(&creds.ca_pem))
                .identity(Identity::from_pem(
                    &creds.identity.cert_pem,
                    &creds.identity.key_pem,
                )),
        ))
    }

    /// A client for the agent of `node` at `ip`, recording its calls in `metrics`.
    pub fn client(
        &self,
        node: &str,
        ip: &str,
        metrics: &Arc<Metrics>,
    ) -> Result<AgentClient, Error> {
        let tls = self.tls(node);
        let generation = tls.as_ref().map_or(0, |(g, _)| *g);
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((known_ip, known_generation, ch)) = map.get(node)
            && known_ip == ip
            && *known_generation == generation
        {
            return Ok(Agent::new(node, ch.clone(), self.settings.timeout, metrics));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let agent_err = |message: String| Error::Agent {
            node: node.to_string(),
            call: "connect",
            code: Code::InvalidArgument,
            message,
        };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{host}:{}", self.settings.port))
            .map_err(|e| agent_err(format!("bad agent address {ip}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(30));
        if let Some((_, tls)) = tls {
            ep = ep
                .tls_config(tls)
                .map_err(|e| agent_err(format!("TLS configuration: {e}")))?;
        }
        let ch = ep.connect_lazy();
        map.insert(node.to_string(), (ip.to_string(), generation, ch.clone()));
        Ok(Agent::new(node, ch, self.settings.timeout, metrics))
    }

    /// Deadline for unary calls.
    pub fn timeout(&self) -> Duration {
        self.settings.timeout
    }
}

/// Whether agent.proto says the caller should retry.
pub fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted
    )
}

/// Runs a unary call, retrying transient failures with exponential backoff
/// (0.2 s, 0.4 s, 0.8 s, 1.6 s); the last status is returned as an `Error::Agent`.
pub async fn call<T, F, Fut>(
    node: &str,
    what: &'static str,
    timeout: Duration,
    mut f: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let mut delay = Duration::from_millis(200);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = match tokio::time::timeout(timeout, f()).await {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {}s",
                timeout.as_secs()
            ))),
        };
        match result {
            Ok(resp) => return Ok(resp.into_inner()),
            Err(s) if transient(s.code()) && attempt < 5 => {
                tracing::debug!(node, what, code = ?s.code(), "agent call failed, retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(s) => return Err(status_error(node, what, &s)),
        }
    }
}

/// The operator's error for a status an agent answered.
pub fn status_error(node: &str, call: &'static str, s: &Status) -> Error {
    Error::Agent {
        node: node.to_string(),
        call,
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// One node's agent.
#[derive(Clone, Debug)]
pub struct Agent {
    node: String,
    inner: NodeAgentClient<Channel>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

/// Declares the retried unary methods of [`Agent`], one per RPC.
macro_rules! unary {
    ($($(#[$doc:meta])* $method:ident($req:ty) -> $resp:ty = $rpc:literal;)*) => {
        $(
            $(#[$doc])*
            pub async fn $method(&self, req: $req) -> Result<$resp, Error> {
                let started = Instant::now();
                let r = call(&self.node, $rpc, self.timeout, || {
                    let (mut c, r) = (self.inner.clone(), req.clone());
                    async move { c.$method(r).await }
                })
                .await;
                self.record($rpc, started, &r);
                r
            }
        )*
    };
}

impl Agent {
    fn new(node: &str, channel: Channel, timeout: Duration, metrics: &Arc<Metrics>) -> Self {
        Self {
            node: node.to_string(),
            inner: NodeAgentClient::new(channel),
            timeout,
            metrics: metrics.clone(),
        }
    }

    /// The node this agent runs on.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn record<T>(&self, rpc: &'static str, started: Instant, r: &Result<T, Error>) {
        let code = match r {
            Ok(_) => Code::Ok,
            Err(Error::Agent { code, .. }) => *code,
            Err(_) => Code::Unknown,
        };
        self.metrics.agent_call(rpc, code, started.elapsed());
        tracing::debug!(node = %self.node, rpc, ?code, ms = started.elapsed().as_millis() as u64, "agent call");
    }

    /// Opens a server stream: the deadline covers the first answer (the headers), not
    /// the stream, whose pace is the work's (an import, a migration).
    async fn open<T>(
        &self,
        rpc: &'static str,
        fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Error> {
        let started = Instant::now();
        let r = match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(s)) => Err(status_error(&self.node, rpc, &s)),
            Err(_) => Err(status_error(
                &self.node,
                rpc,
                &Status::deadline_exceeded(format!("no answer within {}s", self.timeout.as_secs())),
            )),
        };
        self.record(rpc, started, &r);
        r
    }

    unary! {
        /// What the node can do, and the networks it carries.
        get_capabilities(pb::GetCapabilitiesRequest) -> pb::NodeCapabilities = "GetCapabilities";
        /// Creates (or finds) a VM disk's overlay over its base.
        ensure_overlay(pb::EnsureOverlayRequest) -> pb::OverlayInfo = "EnsureOverlay";
        /// Deletes a VM disk's overlay (refused while its QEMU runs).
        delete_overlay(pb::DeleteOverlayRequest) -> pb::DeleteOverlayResponse = "DeleteOverlay";
        /// Drops an OverlayDisk's base reference.
        release_disk(pb::ReleaseDiskRequest) -> pb::ReleaseDiskResponse = "ReleaseDisk";
        /// The complete desired state of a network on the node.
        ensure_network(pb::EnsureNetworkRequest) -> pb::NetworkState = "EnsureNetwork";
        /// Removes a network from the node.
        delete_network(pb::DeleteNetworkRequest) -> pb::DeleteNetworkResponse = "DeleteNetwork";
        /// A VM's state as its launcher reports it.
        get_vm(pb::VmRef) -> pb::VmState = "GetVm";
        /// Readies the node to receive a live migration.
        prepare_migration_target(pb::PrepareMigrationTargetRequest) -> pb::MigrationEndpoint = "PrepareMigrationTarget";
        /// Cancels a migration in flight.
        cancel_migration(pb::CancelMigrationRequest) -> pb::CancelMigrationResponse = "CancelMigration";
        /// What the node holds of a disk's upload, and its room for it.
        get_upload(pb::GetUploadRequest) -> pb::UploadState = "GetUpload";
    }

    /// Imports an OverlayDisk's base; progress streams until Ready or Failed.
    pub async fn prepare_disk(
        &self,
        req: pb::PrepareDiskRequest,
    ) -> Result<tonic::Streaming<pb::DiskProgress>, Error> {
        let mut c = self.inner.clone();
        self.open("PrepareDisk", c.prepare_disk(req)).await
    }

    /// Streams a stopped VM's overlay chain out (cold moves).
    pub async fn export_overlay(
        &self,
        req: pb::ExportOverlayRequest,
    ) -> Result<tonic::Streaming<pb::OverlayChunk>, Error> {
        let mut c = self.inner.clone();
        self.open("ExportOverlay", c.export_overlay(req)).await
    }

    /// Takes an exported overlay chain in. No deadline: the answer comes once the
    /// whole stream arrived and was checked.
    pub async fn import_overlay(
        &self,
        chunks: impl tonic::IntoStreamingRequest<Message = pb::OverlayChunk>,
    ) -> Result<pb::OverlayInfo, Error> {
        let started = Instant::now();
        let mut c = self.inner.clone();
        let r = c
            .import_overlay(chunks)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| status_error(&self.node, "ImportOverlay", &s));
        self.record("ImportOverlay", started, &r);
        r
    }

    /// Stores one chunk of a disk upload (a client stream). No deadline: the answer
    /// comes once the node synced the bytes (and hashed a completed upload).
    pub async fn put_upload(
        &self,
        chunks: impl tonic::IntoStreamingRequest<Message = pb::UploadChunk>,
    ) -> Result<pb::UploadState, Error> {
        let started = Instant::now();
        let mut c = self.inner.clone();
        let r = c
            .put_upload(chunks)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| status_error(&self.node, "PutUpload", &s));
        self.record("PutUpload", started, &r);
        r
    }

    /// Streams a base out by digest (to another node).
    pub async fn export_base(
        &self,
        req: pb::ExportBaseRequest,
    ) -> Result<tonic::Streaming<pb::BaseChunk>, Error> {
        let mut c = self.inner.clone();
        self.open("ExportBase", c.export_base(req)).await
    }

    /// Takes a base in (relayed from another node's ExportBase). No deadline: the
    /// answer comes once the whole base arrived and was checked.
    pub async fn import_base(
        &self,
        chunks: impl tonic::IntoStreamingRequest<Message = pb::BaseChunk>,
    ) -> Result<pb::DiskProgress, Error> {
        let started = Instant::now();
        let mut c = self.inner.clone();
        let r = c
            .import_base(chunks)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| status_error(&self.node, "ImportBase", &s));
        self.record("ImportBase", started, &r);
        r
    }

    /// Starts a live migration on the source; progress streams until the end.
    pub async fn start_migration(
        &self,
        req: pb::StartMigrationRequest,
    ) -> Result<tonic::Streaming<pb::MigrationProgress>, Error> {
        let mut c = self.inner.clone();
        self.open("StartMigration", c.start_migration(req)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retries_transient_codes_then_reports_the_last() {
        let mut n = 0;
        let r: Result<(), Error> = call("n1", "EnsureNetwork", Duration::from_secs(1), || {
            n += 1;
            async { Err(Status::unavailable("agent restarting")) }
        })
        .await;
        assert_eq!(n, 5);
        let msg = r.expect_err("fails").to_string();
        assert!(
            msg.contains("n1") && msg.contains("agent restarting"),
            "{msg}"
        );

        let mut m = 0;
        let r: Result<(), Error> = call("n1", "EnsureOverlay", Duration::from_secs(1), || {
            m += 1;
            async { Err(Status::failed_precondition("base not on this node")) }
        })
        .await;
        assert_eq!(m, 1, "FAILED_PRECONDITION is not retried");
        // The code survives as a typed field, not only as text.
        let e = r.expect_err("fails");
        assert_eq!(e.code(), Some(Code::FailedPrecondition));
        assert_eq!(e.message(), "base not on this node");
        assert_eq!(e.kind(), "agent");
    }
}
