//! The operator's side: its CA, its own certificates (client identity for dialling
//! agents, server certificate of the certificate endpoint), their renewal, the CA
//! bundle published for agents, and the HTTPS endpoint that signs agents' CSRs.

use crate::ca::{Ca, Issued, OperatorCredentials, Usage, renewal_due};
use crate::pem::{self, CertInfo};
use crate::reload::SwappableCert;
use crate::{CA_CONFIGMAP, Error, ISSUE_PATH, LEAF_VALIDITY, issuer_server_name, review};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;

/// Largest CSR accepted (a P-256 or RSA-4096 CSR is well under 4 KiB).
const MAX_CSR_BYTES: usize = 16 * 1024;

/// How often the operator checks its certificates and the CA files.
const MAINTAIN_EVERY: Duration = Duration::from_secs(600);

/// Who a bearer token belongs to (the API server's TokenReview; a fake in tests).
pub trait TokenReviewer: Send + Sync + 'static {
    /// Reviews `token` for the agents' audience.
    fn review<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<TokenReviewStatus, Error>> + Send + 'a>>;
}

impl TokenReviewer for kube::Client {
    fn review<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<TokenReviewStatus, Error>> + Send + 'a>> {
        Box::pin(review::review(self, token))
    }
}

/// The operator's TLS material, kept current by [`OperatorTls::maintain`].
pub struct OperatorTls {
    ca_dir: PathBuf,
    namespace: String,
    validity: Duration,
    provider: Arc<CryptoProvider>,
    /// The client identity the operator dials agents with.
    pub credentials: Arc<OperatorCredentials>,
    server_cert: Arc<SwappableCert>,
    server_info: Mutex<CertInfo>,
}

impl std::fmt::Debug for OperatorTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorTls")
            .field("ca_dir", &self.ca_dir)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl OperatorTls {
    /// Loads the CA from `ca_dir` (see [`Ca::load`]) and mints the operator's
    /// certificates, valid for `validity`.
    pub fn load(ca_dir: PathBuf, namespace: &str, validity: Duration) -> Result<Self, Error> {
        let ca = Ca::load(&ca_dir)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let credentials = Arc::new(OperatorCredentials::new(&ca, validity)?);
        let server = Self::issue_server(&ca, namespace, validity)?;
        let server_info = pem::pem_cert_info("endpoint certificate", server.cert_pem.as_bytes())?;
        let server_cert = Arc::new(SwappableCert::new(&server, &provider)?);
        Ok(Self {
            ca_dir,
            namespace: namespace.to_string(),
            validity,
            provider,
            credentials,
            server_cert,
            server_info: Mutex::new(server_info),
        })
    }

    /// [`OperatorTls::load`] with the standard lifetime.
    pub fn load_default(ca_dir: PathBuf, namespace: &str) -> Result<Self, Error> {
        Self::load(ca_dir, namespace, LEAF_VALIDITY)
    }

    fn issue_server(ca: &Ca, namespace: &str, validity: Duration) -> Result<Issued, Error> {
        let name = issuer_server_name(namespace);
        ca.issue(
            &name,
            &name,
            Usage::Server,
            OffsetDateTime::now_utc(),
            validity,
        )
    }

    /// The CA bundle agents must trust now.
    pub fn bundle(&self) -> String {
        self.credentials.current().ca_pem.clone()
    }

    /// TLS configuration of the certificate endpoint (server certificate only: agents
    /// have no certificate before they get one here; the token authenticates them).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, Error> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.server_cert.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Re-reads the CA files and renews what is past half life or was made by another
    /// CA bundle. Returns whether the bundle agents trust changed.
    pub fn refresh(&self) -> Result<bool, Error> {
        let ca = Ca::load(&self.ca_dir)?;
        let before = self.bundle();
        if let Some(generation) = self.credentials.renew_if_due(&ca, self.validity)? {
            let c = self.credentials.current();
            tracing::info!(generation, serial = %c.info.serial, not_after = %c.info.not_after, "operator client certificate renewed");
        }
        let mut info = self.server_info.lock().unwrap_or_else(|p| p.into_inner());
        if renewal_due(&info, OffsetDateTime::now_utc()) || before != ca.bundle_pem {
            let server = Self::issue_server(&ca, &self.namespace, self.validity)?;
            *info = pem::pem_cert_info("endpoint certificate", server.cert_pem.as_bytes())?;
            self.server_cert.set(&server, &self.provider)?;
            tracing::info!(serial = %info.serial, "certificate endpoint's certificate renewed");
        }
        Ok(before != ca.bundle_pem)
    }

    /// Keeps the certificates current and, with `publish`, the agents' CA bundle
    /// ConfigMap in the operator's namespace. Runs forever.
    pub async fn maintain(self: Arc<Self>, publish: Option<kube::Client>) {
        let mut published: Option<String> = None;
        loop {
            let mut wait = MAINTAIN_EVERY;
            if let Err(e) = self.refresh() {
                tracing::warn!(error = %e, ca_dir = %self.ca_dir.display(), "renewing the operator's certificates");
                wait = Duration::from_secs(60);
            }
            if let Some(client) = &publish {
                let bundle = self.bundle();
                if published.as_ref() != Some(&bundle) {
                    match publish_bundle(client, &self.namespace, &bundle).await {
                        Ok(()) => {
                            tracing::info!(
                                configmap = CA_CONFIGMAP,
                                "CA bundle for agents published"
                            );
                            published = Some(bundle);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "publishing the agents' CA bundle");
                            wait = Duration::from_secs(5);
                        }
                    }
                }
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// Writes the CA bundle agents trust into the ConfigMap [`CA_CONFIGMAP`] (server-side
/// apply: every operator replica writes the same content).
pub async fn publish_bundle(
    client: &kube::Client,
    namespace: &str,
    bundle: &str,
) -> Result<(), Error> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CA_CONFIGMAP,
            "labels": {"app.kubernetes.io/name": "hvx", "app.kubernetes.io/component": "identity"},
        },
        "data": {"ca.crt": bundle},
    });
    api.patch(
        CA_CONFIGMAP,
        &PatchParams::apply("hvx-operator").force(),
        &Patch::Apply(&cm),
    )
    .await
    .map(|_| ())
    .map_err(|e| Error::Kube(format!("ConfigMap {namespace}/{CA_CONFIGMAP}: {e}")))
}

/// What the endpoint answers: a status and a text body (the certificate, or why not).
async fn answer(
    tls: &OperatorTls,
    reviewer: &dyn TokenReviewer,
    method: &Method,
    path: &str,
    authorization: Option<&str>,
    body: &[u8],
) -> (StatusCode, String) {
    if path != ISSUE_PATH {
        return (
            StatusCode::NOT_FOUND,
            format!("only {ISSUE_PATH} is served\n"),
        );
    }
    if method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "POST a CSR\n".into());
    }
    let Some(token) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else {
        return (
            StatusCode::UNAUTHORIZED,
            "an Authorization: Bearer <agent ServiceAccount token> header is required\n".into(),
        );
    };
    let status = match reviewer.review(token.trim()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "TokenReview failed");
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"));
        }
    };
    let node = match review::node_of(&status, &tls.namespace) {
        Ok(n) => n,
        Err(e) => {
            let user = status.user.as_ref().and_then(|u| u.username.clone());
            tracing::warn!(error = %e, ?user, "agent certificate refused");
            return (StatusCode::FORBIDDEN, format!("{e}\n"));
        }
    };
    let Ok(csr) = std::str::from_utf8(body) else {
        return (StatusCode::BAD_REQUEST, "the CSR must be PEM text\n".into());
    };
    let ca = match Ca::load(&tls.ca_dir) {
        Ok(ca) => ca,
        Err(e) => {
            tracing::error!(error = %e, "loading the CA");
            return (StatusCode::INTERNAL_SERVER_ERROR, "CA unavailable\n".into());
        }
    };
    match ca.issue_agent(csr, &node, OffsetDateTime::now_utc(), tls.validity) {
        Ok(cert) => {
            let info = pem::pem_cert_info("agent certificate", cert.as_bytes()).ok();
            tracing::info!(
                node,
                serial = info.as_ref().map(|i| i.serial.as_str()).unwrap_or_default(),
                not_after = ?info.as_ref().map(|i| i.not_after),
                "agent certificate issued"
            );
            (StatusCode::OK, cert)
        }
        Err(e @ Error::CsrRefused(_)) => {
            tracing::warn!(node, error = %e, "agent certificate refused");
            (StatusCode::FORBIDDEN, format!("{e}\n"))
        }
        Err(e) => {
            tracing::error!(node, error = %e, "signing an agent certificate");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
    }
}

async fn handle(
    tls: Arc<OperatorTls>,
    reviewer: Arc<dyn TokenReviewer>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let (code, text) = match Limited::new(body, MAX_CSR_BYTES).collect().await {
        Ok(b) => {
            let auth = parts
                .headers
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            answer(
                &tls,
                reviewer.as_ref(),
                &parts.method,
                parts.uri.path(),
                auth,
                &b.to_bytes(),
            )
            .await
        }
        Err(e) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body: {e} (at most {MAX_CSR_BYTES} bytes)\n"),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = code;
    Ok(resp)
}

/// Serves the certificate endpoint on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<OperatorTls>,
    reviewer: Arc<dyn TokenReviewer>,
) -> Result<(), Error> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config()?);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "certificate endpoint: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, tls, reviewer) = (acceptor.clone(), tls.clone(), reviewer.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "certificate endpoint: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let svc =
                hyper::service::service_fn(move |req| handle(tls.clone(), reviewer.clone(), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "certificate endpoint: connection");
            }
        });
    }
}
