//! The agent's side of mutual TLS: only the operator's client identity is served.

use crate::reload::{FileStamp, ReloadingCert, stamp};
use crate::{Error, OPERATOR_NAME, pem};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Whether a client certificate (already verified to chain to the CA) is the
/// operator's: SAN dNSName [`OPERATOR_NAME`], extended key usage clientAuth present and
/// serverAuth absent (the operator's certificate is client-only, so no server identity,
/// such as an agent's, can be presented as it).
pub fn check_operator_identity(der: &[u8]) -> Result<(), Error> {
    let info = pem::cert_info(der)?;
    if !info.dns_names.iter().any(|n| n == OPERATOR_NAME) {
        return Err(Error::PeerRefused(format!(
            "client certificate names {:?} (CN {:?}), not {OPERATOR_NAME}",
            info.dns_names, info.common_name
        )));
    }
    if !info.client_auth {
        return Err(Error::PeerRefused(
            "client certificate has no clientAuth extended key usage".into(),
        ));
    }
    if info.server_auth {
        return Err(Error::PeerRefused(
            "client certificate is also a server certificate; the operator's is client-only".into(),
        ));
    }
    Ok(())
}

/// Verifies clients chain to the CA bundle in a file (re-read when it changes) and are
/// the operator ([`check_operator_identity`]).
pub struct OperatorClientVerifier {
    roots: PathBuf,
    provider: Arc<CryptoProvider>,
    loaded: Mutex<Option<(FileStamp, Arc<dyn ClientCertVerifier>)>>,
}

impl std::fmt::Debug for OperatorClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorClientVerifier")
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl OperatorClientVerifier {
    /// Trusts the CA certificates in `roots` (PEM).
    pub fn new(roots: PathBuf, provider: Arc<CryptoProvider>) -> Self {
        Self {
            roots,
            provider,
            loaded: Mutex::new(None),
        }
    }

    fn chain_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, Error> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.roots);
        if let (Ok(s), Some((old, v))) = (&now, loaded.as_ref())
            && s == old
        {
            return Ok(v.clone());
        }
        let built = (|| {
            let certs = pem::certs(&self.roots.display().to_string(), &pem::read(&self.roots)?)?;
            let mut store = RootCertStore::empty();
            for c in certs {
                store
                    .add(c)
                    .map_err(|e| Error::Tls(format!("{}: {e}", self.roots.display())))?;
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(store), self.provider.clone())
                .build()
                .map_err(|e| Error::Tls(e.to_string()))
        })();
        match (built, now) {
            (Ok(v), Ok(s)) => {
                tracing::info!(roots = %self.roots.display(), "client CA bundle loaded");
                *loaded = Some((s, v.clone()));
                Ok(v)
            }
            (Ok(v), Err(_)) => Ok(v),
            (Err(e), _) => match loaded.as_ref() {
                Some((_, v)) => {
                    tracing::warn!(error = %e, "client CA bundle unusable; keeping the previous one");
                    Ok(v.clone())
                }
                None => Err(e),
            },
        }
    }
}

impl ClientCertVerifier for OperatorClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; the roots change at run time and the operator has one
        // certificate to offer anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let refuse = |e: Error| {
            tracing::warn!(error = %e, "TLS client refused");
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        };
        let chain = self.chain_verifier().map_err(refuse)?;
        chain
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| tracing::warn!(error = %e, "TLS client refused"))?;
        check_operator_identity(end_entity).map_err(refuse)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The agent's TLS configuration: serves `dir/tls.crt` + `dir/tls.key` and accepts
/// only the operator, chained to `dir/ca.crt`; all three are re-read when they change.
/// ALPN h2 (gRPC).
pub fn agent_server_config(dir: &Path) -> Result<Arc<ServerConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(OperatorClientVerifier::new(
            dir.join("ca.crt"),
            provider.clone(),
        )))
        .with_cert_resolver(Arc::new(ReloadingCert::new(dir, provider)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// TLS connections accepted on `listener` with `config`, for tonic's
/// `serve_with_incoming`. Each handshake runs in its own task (a slow or silent client
/// holds up no other) with a 10 s limit; failed ones are logged and dropped.
pub fn incoming(
    listener: tokio::net::TcpListener,
    config: Arc<ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, sender) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => {
                        let _ = sender.send(Ok(tls)).await;
                    }
                    // Probes connect and close without a handshake: not worth a warning.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        tracing::debug!(%peer, error = %e, "TLS handshake abandoned")
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Ca, Usage};
    use time::OffsetDateTime;

    const DAY: std::time::Duration = std::time::Duration::from_secs(86400);

    fn der(pem_text: &str) -> CertificateDer<'static> {
        pem::certs("t", pem_text.as_bytes()).expect("pem").remove(0)
    }

    #[test]
    fn only_the_operator_identity_passes() {
        let (ca, _) = Ca::generate("ca").expect("ca");
        let now = OffsetDateTime::now_utc();
        let op = ca.issue_operator(now, DAY).expect("op");
        check_operator_identity(&der(&op.cert_pem)).expect("operator accepted");

        let agent = ca
            .issue("n1", "n1.agent.hvx", Usage::Server, now, DAY)
            .expect("agent");
        let e = check_operator_identity(&der(&agent.cert_pem)).expect_err("agent refused");
        assert!(e.to_string().contains("not hvx-operator"), "{e}");

        // Named right but a server certificate: refused for its usage.
        let server_named_op = ca
            .issue("hvx-operator", "hvx-operator", Usage::Server, now, DAY)
            .expect("server");
        let e = check_operator_identity(&der(&server_named_op.cert_pem)).expect_err("refused");
        assert!(e.to_string().contains("clientAuth"), "{e}");

        // A client certificate of another name.
        let tenant = ca
            .issue("tenant", "tenant", Usage::Client, now, DAY)
            .expect("client");
        assert!(check_operator_identity(&der(&tenant.cert_pem)).is_err());
    }

    #[test]
    fn verifier_checks_the_chain_then_the_name_and_reloads_roots() {
        let dir = tempfile::tempdir().expect("tmp");
        let roots = dir.path().join("ca.crt");
        let (ca, ca_files) = Ca::generate("ca").expect("ca");
        let (other, other_files) = Ca::generate("other").expect("ca");
        pem::write_atomic(&roots, ca_files.cert_pem.as_bytes(), 0o644).expect("write");
        let v = OperatorClientVerifier::new(
            roots.clone(),
            Arc::new(rustls::crypto::ring::default_provider()),
        );
        let now = OffsetDateTime::now_utc();
        let at = UnixTime::now();

        let op = ca.issue_operator(now, DAY).expect("op");
        v.verify_client_cert(&der(&op.cert_pem), &[], at)
            .expect("operator of this CA");
        let foreign = other.issue_operator(now, DAY).expect("op");
        assert!(
            v.verify_client_cert(&der(&foreign.cert_pem), &[], at)
                .is_err()
        );
        let agent = ca
            .issue("n1", "n1.agent.hvx", Usage::Server, now, DAY)
            .expect("agent");
        assert!(
            v.verify_client_cert(&der(&agent.cert_pem), &[], at)
                .is_err()
        );

        // The bundle now trusts the other CA only: the files rule, no restart.
        pem::write_atomic(&roots, other_files.cert_pem.as_bytes(), 0o644).expect("write");
        v.verify_client_cert(&der(&foreign.cert_pem), &[], at)
            .expect("new CA trusted");
        assert!(v.verify_client_cert(&der(&op.cert_pem), &[], at).is_err());
    }
}
