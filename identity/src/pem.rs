//! Reading certificates and keys, and what a certificate says about itself.

use crate::Error;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::Path;
use time::OffsetDateTime;

fn bad(what: &str, reason: impl std::fmt::Display) -> Error {
    Error::BadPem {
        what: what.to_string(),
        reason: reason.to_string(),
    }
}

/// Every certificate in `pem` (at least one).
pub fn certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(what, e))?;
    if certs.is_empty() {
        return Err(bad(what, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The private key in `pem`.
pub fn private_key(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| bad(what, e))
}

/// Reads a file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Writes `data` to `path` through a temporary file and a rename, so a reader sees
/// the old or the new content, never half of one; `mode` are the new file's permissions.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A PKCS#8 document for a key given as PKCS#8 or as PKCS#1 RSA (what Helm's `genCA`
/// and cert-manager write by default; ring signs only from PKCS#8).
pub fn to_pkcs8(what: &str, key: PrivateKeyDer<'_>) -> Result<PrivatePkcs8KeyDer<'static>, Error> {
    match key {
        PrivateKeyDer::Pkcs8(k) => Ok(k.clone_key()),
        PrivateKeyDer::Pkcs1(k) => Ok(PrivatePkcs8KeyDer::from(wrap_pkcs1(k.secret_pkcs1_der()))),
        PrivateKeyDer::Sec1(_) => Err(bad(
            what,
            "an EC key in SEC1 form: give it as PKCS#8 (cert-manager: privateKey.encoding PKCS8)",
        )),
        _ => Err(bad(what, "unsupported private key form")),
    }
}

/// DER length octets.
fn der_len(n: usize, out: &mut Vec<u8>) {
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

/// PrivateKeyInfo { version 0, rsaEncryption with NULL parameters, OCTET STRING pkcs1 }.
fn wrap_pkcs1(pkcs1: &[u8]) -> Vec<u8> {
    const VERSION_AND_ALG: [u8; 18] = [
        0x02, 0x01, 0x00, // INTEGER 0
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05,
        0x00, // SEQUENCE { OID 1.2.840.113549.1.1.1, NULL }
    ];
    let mut body = VERSION_AND_ALG.to_vec();
    body.push(0x04);
    der_len(pkcs1.len(), &mut body);
    body.extend_from_slice(pkcs1);
    let mut out = vec![0x30];
    der_len(body.len(), &mut out);
    out.extend(body);
    out
}

/// What the checks need to know of a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Subject common name, if any.
    pub common_name: Option<String>,
    /// SAN dNSNames.
    pub dns_names: Vec<String>,
    /// Extended key usage clientAuth present.
    pub client_auth: bool,
    /// Extended key usage serverAuth present.
    pub server_auth: bool,
    /// Whether an extended key usage extension is present at all.
    pub has_eku: bool,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// Reads what [`CertInfo`] holds from a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad("certificate", e))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(bad("certificate SAN", e)),
    };
    let (has_eku, client_auth, server_auth) = match cert.extended_key_usage() {
        Ok(Some(eku)) => (true, eku.value.client_auth, eku.value.server_auth),
        Ok(None) => (false, false, false),
        Err(e) => return Err(bad("certificate extended key usage", e)),
    };
    Ok(CertInfo {
        serial: cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        common_name,
        dns_names,
        client_auth,
        server_auth,
        has_eku,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

/// [`CertInfo`] of the first certificate in a PEM file's content.
pub fn pem_cert_info(what: &str, pem: &[u8]) -> Result<CertInfo, Error> {
    let certs = certs(what, pem)?;
    cert_info(&certs[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths() {
        let mut v = Vec::new();
        der_len(5, &mut v);
        der_len(0x80, &mut v);
        der_len(0x1234, &mut v);
        assert_eq!(v, [5, 0x81, 0x80, 0x82, 0x12, 0x34]);
    }

    #[test]
    fn sec1_keys_are_refused_with_a_hint() {
        let key = PrivateKeyDer::Sec1(vec![1, 2, 3].into());
        let e = to_pkcs8("ca key", key).expect_err("refused").to_string();
        assert!(e.contains("PKCS8"), "{e}");
    }
}
