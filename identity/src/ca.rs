//! The operator's CA: signs agent CSRs (after the checks in [`Ca::issue_agent`]) and
//! the operator's own leaf certificates.

use crate::pem::{self, CertInfo};
use crate::{Error, OPERATOR_NAME, agent_server_name, valid_node_name};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use time::OffsetDateTime;

/// Tolerated clock skew between nodes: certificates start this much in the past.
const BACKDATE: Duration = Duration::from_secs(300);

/// What a leaf certificate may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// TLS server only.
    Server,
    /// TLS client only.
    Client,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// A CA able to sign.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificates clients and servers trust (`ca.crt`: during a CA rotation
    /// the old and the new one).
    pub bundle_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn cert_err(e: rcgen::Error) -> Error {
    Error::Certificate(e.to_string())
}

fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|e| Error::Certificate(format!("random serial: {e:?}")))?;
    // Positive and without a leading zero octet.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn leaf_params(
    common_name: &str,
    dns_name: &str,
    usage: Usage,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::new(vec![dns_name.to_string()]).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match usage {
        Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl Ca {
    /// The CA in `dir`: `tls.crt` and `tls.key` (the CA's certificate and key, PKCS#8 or
    /// PKCS#1 RSA) and `ca.crt` (the bundle to trust; `tls.crt` if absent), as Helm and
    /// cert-manager lay out the `hvx-ca` Secret.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let cert_pem = pem::read(&dir.join("tls.crt"))?;
        let key_pem = pem::read(&dir.join("tls.key"))?;
        let bundle_pem = match std::fs::read(dir.join("ca.crt")) {
            Ok(b) if !b.is_empty() => b,
            _ => cert_pem.clone(),
        };
        Self::from_pem(&cert_pem, &key_pem, &bundle_pem)
    }

    /// A CA from its certificate, key and trust bundle (PEM).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], bundle_pem: &[u8]) -> Result<Self, Error> {
        let key = pem::to_pkcs8("CA key", pem::private_key("CA key", key_pem)?)?;
        let key = KeyPair::try_from(&key).map_err(|e| Error::BadPem {
            what: "CA key".into(),
            reason: e.to_string(),
        })?;
        let cert_text = std::str::from_utf8(cert_pem).map_err(|e| Error::BadPem {
            what: "CA certificate".into(),
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(cert_text, key).map_err(|e| Error::BadPem {
            what: "CA certificate".into(),
            reason: e.to_string(),
        })?;
        // The bundle must parse: agents get it verbatim.
        pem::certs("CA bundle", bundle_pem)?;
        let bundle_pem = String::from_utf8_lossy(bundle_pem).into_owned();
        Ok(Self { issuer, bundle_pem })
    }

    /// A new self-signed CA (tests, and setups without Helm): the CA and its
    /// certificate and key as `Ca::load` reads them.
    pub fn generate(common_name: &str) -> Result<(Self, Issued), Error> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key).map_err(cert_err)?;
        let issued = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        let ca = Self::from_pem(
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            issued.cert_pem.as_bytes(),
        )?;
        Ok((ca, issued))
    }

    /// A new key and a certificate for it, named `dns_name` (SAN) and `common_name`
    /// (CN), for `usage` only.
    pub fn issue(
        &self,
        common_name: &str,
        dns_name: &str,
        usage: Usage,
        now: OffsetDateTime,
        validity: Duration,
    ) -> Result<Issued, Error> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let params = leaf_params(common_name, dns_name, usage, now, validity)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The operator's client certificate: client-auth only, named [`OPERATOR_NAME`].
    pub fn issue_operator(&self, now: OffsetDateTime, validity: Duration) -> Result<Issued, Error> {
        self.issue(OPERATOR_NAME, OPERATOR_NAME, Usage::Client, now, validity)
    }

    /// Signs the agent of `node`'s CSR (PEM). `node` comes from the TokenReview, never
    /// from the request. The CSR proves possession of its key (its signature is
    /// checked); it may ask for nothing beyond the one name of that node's agent and
    /// server authentication. What is signed is built here, not copied from the CSR:
    /// CN the node, SAN `<node>.agent.hvx`, serverAuth only, not a CA.
    pub fn issue_agent(
        &self,
        csr_pem: &str,
        node: &str,
        now: OffsetDateTime,
        validity: Duration,
    ) -> Result<String, Error> {
        if !valid_node_name(node) {
            return Err(Error::CsrRefused(format!("{node:?} is not a node name")));
        }
        let want = agent_server_name(node);
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::CsrRefused(format!("unreadable or unsigned CSR: {e}")))?;
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::DnsName(d) if d.as_str() == want => {}
                other => {
                    return Err(Error::CsrRefused(format!(
                        "asks for {other:?}; the agent of node {node} may have only {want}"
                    )));
                }
            }
        }
        if matches!(csr.params.is_ca, IsCa::Ca(_)) {
            return Err(Error::CsrRefused("asks to be a CA".into()));
        }
        if let Some(eku) = csr
            .params
            .extended_key_usages
            .iter()
            .find(|u| **u != ExtendedKeyUsagePurpose::ServerAuth)
        {
            return Err(Error::CsrRefused(format!(
                "asks for usage {eku:?}; agents get server authentication only"
            )));
        }
        let params = leaf_params(node, &want, Usage::Server, now, validity)?;
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(cert_err)?;
        Ok(signed.pem())
    }
}

/// A CSR (PEM) for the agent of `node` with `key`: SAN `<node>.agent.hvx`, CN the node,
/// server authentication.
pub fn agent_csr(node: &str, key: &KeyPair) -> Result<String, Error> {
    let mut params = CertificateParams::new(vec![agent_server_name(node)]).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(cert_err)
}

/// The operator's current client credentials, renewed in place
/// ([`OperatorCredentials::renew_if_due`]); readers take a snapshot per connection, so a
/// renewal reaches new connections while open ones carry on.
pub struct OperatorCredentials {
    current: RwLock<Arc<Credentials>>,
}

/// One generation of the operator's client credentials.
#[derive(Clone)]
pub struct Credentials {
    /// Increases with every renewal (callers key cached connections by it).
    pub generation: u64,
    /// Client certificate and key.
    pub identity: Issued,
    /// CA bundle agents' certificates must chain to.
    pub ca_pem: String,
    /// What the certificate says (serial, validity).
    pub info: CertInfo,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("generation", &self.generation)
            .field("serial", &self.info.serial)
            .field("not_after", &self.info.not_after)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for OperatorCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.current().fmt(f)
    }
}

/// Whether a certificate valid from `not_before` to `not_after` is past half its life
/// at `now` (or expired, or not yet valid).
pub fn renewal_due(info: &CertInfo, now: OffsetDateTime) -> bool {
    let half = info.not_before + (info.not_after - info.not_before) / 2;
    now >= half || now < info.not_before
}

impl OperatorCredentials {
    /// First credentials from `ca`.
    pub fn new(ca: &Ca, validity: Duration) -> Result<Self, Error> {
        let creds = Self::make(ca, 1, validity)?;
        Ok(Self {
            current: RwLock::new(Arc::new(creds)),
        })
    }

    fn make(ca: &Ca, generation: u64, validity: Duration) -> Result<Credentials, Error> {
        let identity = ca.issue_operator(OffsetDateTime::now_utc(), validity)?;
        let info = pem::pem_cert_info("operator certificate", identity.cert_pem.as_bytes())?;
        Ok(Credentials {
            generation,
            identity,
            ca_pem: ca.bundle_pem.clone(),
            info,
        })
    }

    /// The credentials to use for a new connection.
    pub fn current(&self) -> Arc<Credentials> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reissues from `ca` when half the certificate's life has passed or the CA bundle
    /// changed; returns the new generation if it did.
    pub fn renew_if_due(&self, ca: &Ca, validity: Duration) -> Result<Option<u64>, Error> {
        let cur = self.current();
        if !renewal_due(&cur.info, OffsetDateTime::now_utc()) && cur.ca_pem == ca.bundle_pem {
            return Ok(None);
        }
        let next = Self::make(ca, cur.generation + 1, validity)?;
        let generation = next.generation;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(Some(generation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pem::pem_cert_info;

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn agent_certificate_names_its_node_and_serves_only() {
        let (ca, _) = Ca::generate("test-ca").expect("ca");
        let key = KeyPair::generate().expect("key");
        let csr = agent_csr("worker-1", &key).expect("csr");
        let now = OffsetDateTime::now_utc();
        let pem = ca.issue_agent(&csr, "worker-1", now, DAY).expect("issued");
        let info = pem_cert_info("agent", pem.as_bytes()).expect("info");
        assert_eq!(info.dns_names, ["worker-1.agent.hvx"]);
        assert_eq!(info.common_name.as_deref(), Some("worker-1"));
        assert!(info.server_auth && !info.client_auth);
        assert!(info.not_after - now <= time::Duration::seconds(86400));
        assert!(info.not_after - now > time::Duration::seconds(86000));
    }

    #[test]
    fn a_csr_for_another_node_is_refused() {
        let (ca, _) = Ca::generate("test-ca").expect("ca");
        let key = KeyPair::generate().expect("key");
        // The token says worker-1; the CSR names worker-2.
        let csr = agent_csr("worker-2", &key).expect("csr");
        let e = ca
            .issue_agent(&csr, "worker-1", OffsetDateTime::now_utc(), DAY)
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("worker-2.agent.hvx") && e.contains("worker-1"),
            "{e}"
        );
    }

    #[test]
    fn a_csr_asking_for_client_auth_or_extra_names_is_refused() {
        let (ca, _) = Ca::generate("test-ca").expect("ca");
        let key = KeyPair::generate().expect("key");
        let now = OffsetDateTime::now_utc();

        let mut p = CertificateParams::new(vec!["n1.agent.hvx".to_string()]).expect("params");
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let csr = p
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .expect("csr");
        let e = ca.issue_agent(&csr, "n1", now, DAY).expect_err("refused");
        assert!(e.to_string().contains("ClientAuth"), "{e}");

        let p =
            CertificateParams::new(vec!["n1.agent.hvx".to_string(), "hvx-operator".to_string()])
                .expect("params");
        let csr = p
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .expect("csr");
        let e = ca.issue_agent(&csr, "n1", now, DAY).expect_err("refused");
        assert!(e.to_string().contains("hvx-operator"), "{e}");

        let mut p = CertificateParams::new(vec!["n1.agent.hvx".to_string()]).expect("params");
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let csr = p
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .expect("csr");
        let e = ca.issue_agent(&csr, "n1", now, DAY).expect_err("refused");
        assert!(e.to_string().contains("CA"), "{e}");

        let e = ca
            .issue_agent(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                "n1",
                now,
                DAY,
            )
            .expect_err("refused");
        assert!(e.to_string().contains("CSR"), "{e}");

        let csr = agent_csr("n1", &key).expect("csr");
        let e = ca
            .issue_agent(&csr, "N1/../x", now, DAY)
            .expect_err("refused");
        assert!(e.to_string().contains("not a node name"), "{e}");
    }

    #[test]
    fn operator_certificate_is_client_only() {
        let (ca, _) = Ca::generate("test-ca").expect("ca");
        let issued = ca
            .issue_operator(OffsetDateTime::now_utc(), DAY)
            .expect("issued");
        let info = pem_cert_info("operator", issued.cert_pem.as_bytes()).expect("info");
        assert_eq!(info.dns_names, [OPERATOR_NAME]);
        assert!(info.client_auth && !info.server_auth);
    }

    #[test]
    fn helm_rsa_pkcs1_ca_signs() {
        // What Helm's genCA writes: an RSA key as "RSA PRIVATE KEY" (PKCS#1).
        let cert = include_bytes!("../testdata/helm-ca.crt");
        let key = include_bytes!("../testdata/helm-ca.key");
        assert!(String::from_utf8_lossy(key).contains("BEGIN RSA PRIVATE KEY"));
        let ca = Ca::from_pem(cert, key, cert).expect("PKCS#1 CA loads");
        let issued = ca
            .issue_operator(OffsetDateTime::now_utc(), DAY)
            .expect("RSA-signed");
        pem_cert_info("operator", issued.cert_pem.as_bytes()).expect("parses");
    }

    #[test]
    fn operator_credentials_renew_at_half_life_or_on_a_new_bundle() {
        let (ca, _) = Ca::generate("test-ca").expect("ca");
        let creds = OperatorCredentials::new(&ca, DAY).expect("creds");
        assert_eq!(creds.renew_if_due(&ca, DAY).expect("renew"), None);
        // A lifetime shorter than the backdating is past half life at once.
        let short = OperatorCredentials::new(&ca, Duration::from_secs(1)).expect("creds");
        let before = short.current().info.serial.clone();
        assert_eq!(short.renew_if_due(&ca, DAY).expect("renew"), Some(2));
        assert_ne!(short.current().info.serial, before);
        let (other, _) = Ca::generate("new-ca").expect("ca");
        assert_eq!(creds.renew_if_due(&other, DAY).expect("renew"), Some(2));
        assert_eq!(creds.current().ca_pem, other.bundle_pem);
    }
}
