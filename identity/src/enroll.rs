//! The agent's side: keeps `ca.crt`, `tls.key` and `tls.crt` in its TLS directory
//! current. The key is made on the node and never leaves it; the certificate comes
//! from the operator's endpoint in exchange for a CSR and the agent pod's projected
//! ServiceAccount token (audience `hvx-operator`), at start when there is none usable
//! and at half life after that. The agent's server re-reads the files
//! ([`crate::reload`]), so nothing restarts.

use crate::ca::{agent_csr, renewal_due};
use crate::pem::{self, CertInfo};
use crate::{CA_CONFIGMAP, Error, ISSUE_PATH, agent_server_name};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use rcgen::KeyPair;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// Where the CA bundle comes from.
#[derive(Clone)]
pub enum CaSource {
    /// The ConfigMap the operator publishes in its namespace.
    ConfigMap {
        /// API client.
        client: kube::Client,
        /// The operator's namespace.
        namespace: String,
    },
    /// A file (set up by hand, or tests).
    File(PathBuf),
}

impl std::fmt::Debug for CaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ConfigMap { namespace, .. } => write!(f, "ConfigMap {namespace}/{CA_CONFIGMAP}"),
            Self::File(p) => write!(f, "file {}", p.display()),
        }
    }
}

/// An agent's enrolment.
#[derive(Clone, Debug)]
pub struct Enroller {
    /// Directory of `ca.crt`, `tls.key`, `tls.crt` (created 0700).
    pub dir: PathBuf,
    /// This node's name (what the CSR asks for; the operator checks it against the token).
    pub node: String,
    /// The operator's endpoint, `https://host:port`.
    pub url: String,
    /// The server name the endpoint's certificate must carry (default: the URL's host).
    pub server_name: Option<String>,
    /// The projected ServiceAccount token (re-read for every request: the kubelet
    /// refreshes it).
    pub token_file: PathBuf,
    /// The CA bundle's source.
    pub ca: CaSource,
}

/// Longest wait between two looks at the certificate and the CA bundle.
const CHECK_EVERY: Duration = Duration::from_secs(3600);
/// Retry delays while the operator cannot issue (it may not be up yet).
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(10);

impl Enroller {
    fn host_port(&self) -> Result<(String, String), Error> {
        let bad = |why: &str| Error::Unreachable {
            url: self.url.clone(),
            reason: why.to_string(),
        };
        let rest = self
            .url
            .strip_prefix("https://")
            .ok_or_else(|| bad("must start with https://"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| bad("needs host:port"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad("needs host:port"));
        }
        Ok((
            host.trim_matches(['[', ']']).to_string(),
            format!("{host}:{port}"),
        ))
    }

    /// What the certificate on disk says, if there is a usable pair.
    pub fn current(&self) -> Option<CertInfo> {
        if !self.dir.join("tls.key").exists() {
            return None;
        }
        let pem = std::fs::read(self.dir.join("tls.crt")).ok()?;
        pem::pem_cert_info("tls.crt", &pem).ok()
    }

    async fn fetch_bundle(&self) -> Result<String, Error> {
        let bundle = match &self.ca {
            CaSource::File(p) => String::from_utf8_lossy(&pem::read(p)?).into_owned(),
            CaSource::ConfigMap { client, namespace } => {
                use k8s_openapi::api::core::v1::ConfigMap;
                let api: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), namespace);
                let cm = api.get_opt(CA_CONFIGMAP).await.map_err(|e| {
                    Error::Kube(format!("reading ConfigMap {namespace}/{CA_CONFIGMAP}: {e}"))
                })?;
                cm.and_then(|c| c.data)
                    .and_then(|mut d| d.remove("ca.crt"))
                    .ok_or_else(|| {
                        Error::Kube(format!(
                            "ConfigMap {namespace}/{CA_CONFIGMAP} has no ca.crt yet (the operator publishes it at start)"
                        ))
                    })?
            }
        };
        pem::certs("CA bundle", bundle.as_bytes())?;
        Ok(bundle)
    }

    /// Fetches the CA bundle and writes `ca.crt` if it changed.
    pub async fn refresh_bundle(&self) -> Result<String, Error> {
        let bundle = self.fetch_bundle().await?;
        let path = self.dir.join("ca.crt");
        if std::fs::read(&path).ok().as_deref() != Some(bundle.as_bytes()) {
            pem::write_atomic(&path, bundle.as_bytes(), 0o644)?;
            tracing::info!(path = %path.display(), "CA bundle updated");
        }
        Ok(bundle)
    }

    /// One round: CA bundle, new key, CSR, certificate; the files are written when the
    /// certificate names this node's agent and matches the new key.
    pub async fn enroll_once(&self) -> Result<CertInfo, Error> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(&self.dir, e))?;
        }
        let bundle = self.refresh_bundle().await?;
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| Error::io(&self.token_file, e))?;
        let key = KeyPair::generate().map_err(|e| Error::Certificate(e.to_string()))?;
        let csr = agent_csr(&self.node, &key)?;
        let cert_pem = self.post(&bundle, token.trim(), csr).await?;

        let want = agent_server_name(&self.node);
        let certs = pem::certs("issued certificate", cert_pem.as_bytes())?;
        let info = pem::cert_info(&certs[0])?;
        if info.dns_names != [want.as_str()] || !info.server_auth {
            return Err(Error::CsrRefused(format!(
                "the operator returned a certificate for {:?} (serverAuth {}), not {want}",
                info.dns_names, info.server_auth
            )));
        }
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&certs[0]).map_err(|e| Error::BadPem {
                what: "issued certificate".into(),
                reason: e.to_string(),
            })?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(Error::CsrRefused(
                "the operator returned a certificate for another key".into(),
            ));
        }
        // Key first: until the certificate follows, the server keeps the old pair.
        pem::write_atomic(
            &self.dir.join("tls.key"),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        pem::write_atomic(&self.dir.join("tls.crt"), cert_pem.as_bytes(), 0o644)?;
        Ok(info)
    }

    async fn post(&self, bundle: &str, token: &str, csr: String) -> Result<String, Error> {
        let (host, authority) = self.host_port()?;
        let unreachable = |reason: String| Error::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let mut roots = RootCertStore::empty();
        for c in pem::certs("CA bundle", bundle.as_bytes())? {
            roots
                .add(c)
                .map_err(|e| Error::Tls(format!("CA bundle: {e}")))?;
        }
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Tls(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = self.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| unreachable(format!("server name {name}: {e}")))?;

        let io = async {
            let tcp = tokio::net::TcpStream::connect(&authority)
                .await
                .map_err(|e| unreachable(format!("connect: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(server_name, tcp)
                .await
                .map_err(|e| unreachable(format!("TLS: {e}")))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| unreachable(format!("HTTP: {e}")))?;
            tokio::spawn(conn);
            let req = hyper::Request::post(ISSUE_PATH)
                .header(hyper::header::HOST, &authority)
                .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
                .header(hyper::header::CONTENT_TYPE, "application/pkcs10")
                .body(Full::new(Bytes::from(csr)))
                .map_err(|e| unreachable(format!("request: {e}")))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| unreachable(format!("HTTP: {e}")))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, Error>((status, String::from_utf8_lossy(&body).into_owned()))
        };
        let (status, body) = tokio::time::timeout(Duration::from_secs(30), io)
            .await
            .map_err(|_| unreachable("no answer within 30 s".into()))??;
        if !status.is_success() {
            return Err(Error::Issuer {
                url: self.url.clone(),
                status: status.as_u16(),
                body: body.trim().to_string(),
            });
        }
        Ok(body)
    }

    /// Keeps the files current forever: enrols when there is no usable certificate or
    /// it is past half life, retrying with backoff (2 s doubling to 10 s: agents start before the operator, and VMs wait for them) and a log line
    /// per failure; otherwise looks again within the hour (and refreshes the CA bundle).
    pub async fn run(self) {
        let mut retry = RETRY_FIRST;
        loop {
            let now = OffsetDateTime::now_utc();
            if let Some(info) = self.current()
                && !renewal_due(&info, now)
                && info.not_after > now
            {
                if let Err(e) = self.refresh_bundle().await {
                    tracing::warn!(error = %e, "refreshing the CA bundle");
                }
                let half = info.not_before + (info.not_after - info.not_before) / 2;
                let wait = Duration::try_from(half - now).unwrap_or(Duration::ZERO);
                tokio::time::sleep(wait.clamp(Duration::from_secs(1), CHECK_EVERY)).await;
                continue;
            }
            match self.enroll_once().await {
                Ok(info) => {
                    tracing::info!(node = %self.node, serial = %info.serial, not_after = %info.not_after, "agent certificate issued by the operator");
                    retry = RETRY_FIRST;
                }
                Err(e) => {
                    tracing::warn!(error = %e, url = %self.url, retry_in_s = retry.as_secs(), "no certificate for this node's agent yet (the operator may not be up); retrying");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enroller(url: &str) -> Enroller {
        Enroller {
            dir: PathBuf::from("/nonexistent"),
            node: "n1".into(),
            url: url.into(),
            server_name: None,
            token_file: PathBuf::from("/nonexistent"),
            ca: CaSource::File(PathBuf::from("/nonexistent")),
        }
    }

    #[test]
    fn endpoint_urls() {
        let (h, a) = enroller("https://hvx-identity.hvx-system.svc:9445")
            .host_port()
            .expect("ok");
        assert_eq!(
            (h.as_str(), a.as_str()),
            (
                "hvx-identity.hvx-system.svc",
                "hvx-identity.hvx-system.svc:9445"
            )
        );
        let (h, a) = enroller("https://[::1]:9445/").host_port().expect("ok");
        assert_eq!((h.as_str(), a.as_str()), ("::1", "[::1]:9445"));
        for bad in ["http://x:1", "https://x", "https://:1", "https://x:port"] {
            assert!(enroller(bad).host_port().is_err(), "{bad}");
        }
    }
}
