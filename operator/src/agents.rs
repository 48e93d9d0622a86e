//! gRPC clients of the node agents: one lazily connected channel per node, dialled at
//! the node's InternalIP (agents use the host network) over mutual TLS, with retries
//! for the transient codes agent.proto names.

use crate::error::Error;
use hvx_proto::v1::node_agent_client::NodeAgentClient;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

/// A connected agent client.
pub type AgentClient = NodeAgentClient<Channel>;

/// How the operator reaches agents.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    /// Agent gRPC port on every node.
    pub port: u16,
    /// Directory with `ca.crt`, `tls.crt`, `tls.key` (the operator's client
    /// certificate); `None` = plaintext (development only).
    pub tls_dir: Option<PathBuf>,
    /// Per-call deadline for unary calls.
    pub timeout: Duration,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            port: hvx_api::node::AGENT_PORT,
            tls_dir: None,
            timeout: Duration::from_secs(60),
        }
    }
}

/// Channels by node, rebuilt when a node's address changes.
#[derive(Debug, Default)]
pub struct AgentPool {
    settings: AgentSettings,
    channels: Mutex<BTreeMap<String, (String, Channel)>>,
}

impl AgentPool {
    /// A pool with these settings.
    pub fn new(settings: AgentSettings) -> Self {
        Self {
            settings,
            channels: Mutex::default(),
        }
    }

    fn tls(&self) -> Result<Option<ClientTlsConfig>, Error> {
        let Some(dir) = &self.settings.tls_dir else {
            return Ok(None);
        };
        let read = |f: &str| {
            std::fs::read(dir.join(f)).map_err(|e| Error::Agent {
                node: String::new(),
                message: format!("reading TLS file {}: {e}", dir.join(f).display()),
            })
        };
        Ok(Some(
            ClientTlsConfig::new()
                .domain_name(hvx_api::node::AGENT_TLS_SERVER_NAME)
                .ca_certificate(Certificate::from_pem(read("ca.crt")?))
                .identity(Identity::from_pem(read("tls.crt")?, read("tls.key")?)),
        ))
    }

    /// A client for the agent of `node` at `ip`.
    pub fn client(&self, node: &str, ip: &str) -> Result<AgentClient, Error> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((known_ip, ch)) = map.get(node)
            && known_ip == ip
        {
            return Ok(NodeAgentClient::new(ch.clone()));
        }
        let scheme = if self.settings.tls_dir.is_some() {
            "https"
        } else {
            "http"
        };
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let agent_err = |message: String| Error::Agent {
            node: node.to_string(),
            message,
        };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{host}:{}", self.settings.port))
            .map_err(|e| agent_err(format!("bad agent address {ip}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(30));
        if let Some(tls) = self.tls()? {
            ep = ep
                .tls_config(tls)
                .map_err(|e| agent_err(format!("TLS configuration: {e}")))?;
        }
        let ch = ep.connect_lazy();
        map.insert(node.to_string(), (ip.to_string(), ch.clone()));
        Ok(NodeAgentClient::new(ch))
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
    what: &str,
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
            Err(s) => {
                return Err(Error::Agent {
                    node: node.to_string(),
                    message: format!("{what}: {:?}: {}", s.code(), s.message()),
                });
            }
        }
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
        assert!(r.is_err());
    }
}
