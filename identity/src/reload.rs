//! Certificates served from files that change under a running server: every TLS
//! handshake checks the files' identity (inode, size, mtime; `stat` follows the symlinks
//! a kubelet swaps for Secret volumes) and re-reads them when it changed. Open
//! connections keep the certificate they were made with.

use crate::{Error, pem};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Identity of a file's content as far as `stat` tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp {
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

/// The stamp of `path`.
pub fn stamp(path: &Path) -> Result<FileStamp, Error> {
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    Ok(FileStamp {
        ino: m.ino(),
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// What was loaded, and the files' stamps when it was.
type Loaded = ((FileStamp, FileStamp), Arc<CertifiedKey>);

/// A server certificate (`tls.crt`) and key (`tls.key`) re-read when they change.
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    loaded: Mutex<Option<Loaded>>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Serves `dir/tls.crt` with `dir/tls.key`.
    pub fn new(dir: &Path, provider: Arc<CryptoProvider>) -> Self {
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            provider,
            loaded: Mutex::new(None),
        }
    }

    fn load(&self) -> Result<Arc<CertifiedKey>, Error> {
        let certs = pem::certs(&self.cert.display().to_string(), &pem::read(&self.cert)?)?;
        let key = pem::private_key(&self.key.display().to_string(), &pem::read(&self.key)?)?;
        let key = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| Error::Tls(format!("{}: {e}", self.key.display())))?;
        let ck = CertifiedKey::new(certs, key);
        // A renewal writes the key, then the certificate: between the two they differ.
        ck.keys_match().map_err(|e| {
            Error::Tls(format!(
                "{} does not match {}: {e}",
                self.key.display(),
                self.cert.display()
            ))
        })?;
        Ok(Arc::new(ck))
    }

    /// The certificate to serve now: the files' content if they changed and are
    /// usable, else what was loaded before.
    pub fn current(&self) -> Result<Arc<CertifiedKey>, Error> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let stamps = (stamp(&self.cert), stamp(&self.key));
        if let (Ok(c), Ok(k)) = &stamps
            && let Some((s, ck)) = loaded.as_ref()
            && s.0 == *c
            && s.1 == *k
        {
            return Ok(ck.clone());
        }
        match self.load() {
            Ok(ck) => {
                // Stamped before reading: a write during the read shows as a change next time.
                if let (Ok(c), Ok(k)) = stamps {
                    let serial = ck
                        .end_entity_cert()
                        .ok()
                        .and_then(|c| pem::cert_info(c).ok())
                        .map(|i| i.serial)
                        .unwrap_or_default();
                    tracing::info!(cert = %self.cert.display(), serial, "serving certificate loaded");
                    *loaded = Some(((c, k), ck.clone()));
                }
                Ok(ck)
            }
            Err(e) => match loaded.as_ref() {
                Some((_, ck)) => {
                    tracing::debug!(error = %e, "certificate files not usable yet; serving the previous one");
                    Ok(ck.clone())
                }
                None => Err(e),
            },
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.current() {
            Ok(ck) => Some(ck),
            Err(e) => {
                tracing::warn!(error = %e, "no serving certificate yet: refusing the connection");
                None
            }
        }
    }
}

/// A server certificate held in memory and replaced by its owner (the operator's
/// certificate endpoint, whose certificate the operator mints itself).
#[derive(Debug)]
pub struct SwappableCert {
    current: std::sync::RwLock<Arc<CertifiedKey>>,
}

impl SwappableCert {
    /// Serves `issued` (PEM) from now on.
    pub fn new(issued: &crate::ca::Issued, provider: &CryptoProvider) -> Result<Self, Error> {
        Ok(Self {
            current: std::sync::RwLock::new(certified(issued, provider)?),
        })
    }

    /// Replaces the certificate for new connections.
    pub fn set(&self, issued: &crate::ca::Issued, provider: &CryptoProvider) -> Result<(), Error> {
        let ck = certified(issued, provider)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = ck;
        Ok(())
    }
}

fn certified(
    issued: &crate::ca::Issued,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, Error> {
    let certs = pem::certs("certificate", issued.cert_pem.as_bytes())?;
    let key = pem::private_key("key", issued.key_pem.as_bytes())?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(certs, key)))
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}
