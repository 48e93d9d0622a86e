//! `--upload`: streams disk files into their OverlayDisks, resumably.
//!
//! Wire protocol (served by the hvx upload endpoint):
//! - `HEAD {base}/namespaces/{ns}/overlaydisks/{name}/upload` answers `Upload-Offset: N`,
//!   the bytes already stored (404: none yet).
//! - `PUT` to the same URL with `Content-Range: bytes S-E/TOTAL` appends bytes S..=E;
//!   the answer may carry the new `Upload-Offset`. A 409 or 416 means the server holds
//!   a different offset: the client asks again and continues from there.
//!
//! Interrupted uploads (network errors, 5xx, Ctrl-C and a rerun) resume from the
//! server's offset, so no byte is sent twice in the common case and none is lost.
//!
//! Every request carries the user's own Kubernetes bearer token (`credentials`): the
//! endpoint checks it with a TokenReview and authorizes `overlaydisks/upload` on the
//! disk with a SubjectAccessReview. Refusals (401, 403, 413, 400) end the upload at
//! once with the endpoint's reason; they are not retried.

use crate::error::{CliError, Result};
use hvx_import::DiskLocation;
use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

/// Where disk bytes go. A trait so the transfer logic is independent of HTTP details.
pub trait UploadEndpoint {
    /// Bytes of `disk` the server already holds.
    fn offset(&self, disk: &str) -> impl Future<Output = Result<u64>>;
    /// Sends `chunk` as bytes `start..start+len` of `total`; returns the server's new
    /// offset.
    fn put(
        &self,
        disk: &str,
        start: u64,
        total: u64,
        chunk: Vec<u8>,
    ) -> impl Future<Output = Result<u64>>;
}

/// The HTTP endpoint.
#[derive(Clone, Debug)]
pub struct HttpEndpoint {
    client: reqwest::Client,
    base: String,
    namespace: String,
    token: Option<String>,
}

impl HttpEndpoint {
    /// An endpoint at `base` (e.g. `https://hvx-upload.example:8443/v1alpha1`).
    pub fn new(base: &str, namespace: &str, token: Option<String>) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| CliError::Usage(format!("cannot build HTTP client: {e}")))?;
        Ok(Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            namespace: namespace.to_owned(),
            token,
        })
    }

    fn url(&self, disk: &str) -> String {
        format!(
            "{}/namespaces/{}/overlaydisks/{disk}/upload",
            self.base, self.namespace
        )
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }
}

fn header_offset(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get("upload-offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn failed(disk: &str, reason: impl Into<String>) -> CliError {
    CliError::Upload {
        disk: disk.to_owned(),
        reason: reason.into(),
    }
}

/// An answer no retry can change (pure): the endpoint's refusals.
pub fn refusal(disk: &str, method: &str, code: u16, body: &str) -> Option<CliError> {
    let hint = match code {
        401 => "the endpoint does not accept your token",
        403 => "you may not upload to this disk",
        413 => "too large for the upload store",
        507 => "the upload store is full",
        400 | 404 => "",
        _ => return None,
    };
    let body = body.trim();
    Some(CliError::UploadRefused {
        disk: disk.to_owned(),
        reason: match (hint.is_empty(), body.is_empty()) {
            (_, true) => format!("{method} answered {code} {hint}"),
            (true, false) => format!("{method} answered {code}: {body}"),
            (false, false) => format!("{method} answered {code} ({hint}): {body}"),
        },
    })
}

impl UploadEndpoint for HttpEndpoint {
    async fn offset(&self, disk: &str) -> Result<u64> {
        let resp = self
            .auth(self.client.head(self.url(disk)))
            .send()
            .await
            .map_err(|e| failed(disk, e.to_string()))?;
        match resp.status().as_u16() {
            200..=299 => {
                header_offset(&resp).ok_or_else(|| failed(disk, "server sent no Upload-Offset"))
            }
            // HEAD has no body: a 404 is "nothing stored yet" (an unknown disk shows
            // up at the first PUT, with the reason).
            404 => Ok(0),
            code => Err(refusal(disk, "HEAD", code, "")
                .unwrap_or_else(|| failed(disk, format!("HEAD answered {code}")))),
        }
    }

    async fn put(&self, disk: &str, start: u64, total: u64, chunk: Vec<u8>) -> Result<u64> {
        let len = chunk.len() as u64;
        let end = start + len.saturating_sub(1);
        let resp = self
            .auth(self.client.put(self.url(disk)))
            .header("Content-Range", format!("bytes {start}-{end}/{total}"))
            .header("Content-Type", "application/octet-stream")
            .body(chunk)
            .send()
            .await
            .map_err(|e| failed(disk, e.to_string()))?;
        let code = resp.status().as_u16();
        let offset = header_offset(&resp);
        let body = resp.text().await.unwrap_or_default();
        match code {
            200..=299 => Ok(offset.unwrap_or(start + len)),
            409 | 416 => Err(failed(disk, "server holds a different offset")),
            code => Err(refusal(disk, "PUT", code, &body)
                .unwrap_or_else(|| failed(disk, format!("PUT answered {code}: {}", body.trim())))),
        }
    }
}

/// The hvx upload Service reached through the API server's service proxy (the
/// default: no URL needed). The API server authenticates the proxy request with the
/// kubeconfig's credentials and consumes `Authorization`, so the user's token rides
/// in `X-Hvx-Upload-Authorization` for the endpoint's own review.
#[derive(Clone)]
pub struct ProxyEndpoint {
    client: kube::Client,
    /// `/api/v1/namespaces/<hvx ns>/services/http:hvx-upload:<port>/proxy/v1alpha1`.
    base: String,
    namespace: String,
    token: String,
}

impl std::fmt::Debug for ProxyEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyEndpoint")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl ProxyEndpoint {
    /// The endpoint of the hvx installation in `hvx_namespace`, for disks of
    /// `namespace`, as the holder of `token`.
    pub fn new(
        client: kube::Client,
        hvx_namespace: &str,
        port: u16,
        namespace: &str,
        token: String,
    ) -> Self {
        Self {
            client,
            base: format!(
                "/api/v1/namespaces/{hvx_namespace}/services/http:hvx-upload:{port}/proxy/v1alpha1"
            ),
            namespace: namespace.to_owned(),
            token,
        }
    }

    fn path(&self, disk: &str) -> String {
        format!(
            "{}/namespaces/{}/overlaydisks/{disk}/upload",
            self.base, self.namespace
        )
    }

    async fn send(
        &self,
        disk: &str,
        mut req: http::Request<Vec<u8>>,
    ) -> Result<(u16, Option<u64>, String)> {
        let auth = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| failed(disk, "the token is not a valid header value"))?;
        req.headers_mut().insert("x-hvx-upload-authorization", auth);
        let resp = self
            .client
            .send(req.map(kube::client::Body::from))
            .await
            .map_err(|e| failed(disk, e.to_string()))?;
        let code = resp.status().as_u16();
        let offset = resp
            .headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        Ok((code, offset, body))
    }
}

impl UploadEndpoint for ProxyEndpoint {
    async fn offset(&self, disk: &str) -> Result<u64> {
        let req = http::Request::head(self.path(disk))
            .body(Vec::new())
            .map_err(|e| failed(disk, e.to_string()))?;
        match self.send(disk, req).await? {
            (404, _, body) if body.contains("does not") => Err(failed(disk, body)),
            (404, _, _) => Ok(0),
            (200..=299, Some(o), _) => Ok(o),
            (200..=299, None, _) => Err(failed(disk, "server sent no Upload-Offset")),
            (code, _, body) => Err(refusal(disk, "HEAD", code, &body)
                .unwrap_or_else(|| failed(disk, format!("HEAD answered {code}: {body}")))),
        }
    }

    async fn put(&self, disk: &str, start: u64, total: u64, chunk: Vec<u8>) -> Result<u64> {
        let len = chunk.len() as u64;
        let end = start + len.saturating_sub(1);
        let req = http::Request::put(self.path(disk))
            .header("Content-Range", format!("bytes {start}-{end}/{total}"))
            .header("Content-Type", "application/octet-stream")
            .body(chunk)
            .map_err(|e| failed(disk, e.to_string()))?;
        match self.send(disk, req).await? {
            (200..=299, o, _) => Ok(o.unwrap_or(start + len)),
            (409 | 416, _, _) => Err(failed(disk, "server holds a different offset")),
            (code, _, body) => Err(refusal(disk, "PUT", code, &body)
                .unwrap_or_else(|| failed(disk, format!("PUT answered {code}: {body}")))),
        }
    }
}

/// Transfer tuning.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Bytes per PUT.
    pub chunk_bytes: usize,
    /// Consecutive failures tolerated before giving up.
    pub max_retries: u32,
    /// First backoff; doubles per consecutive failure, capped at 10 s.
    pub backoff: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            chunk_bytes: 8 << 20,
            max_retries: 8,
            backoff: Duration::from_millis(500),
        }
    }
}

/// Progress lines on stderr: a rewritten line on a terminal, one line per 10% otherwise.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    last_tenth: u64,
    tty: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last_tenth: 0,
            tty: std::io::stderr().is_terminal(),
        }
    }
}

impl Progress {
    fn report(&mut self, disk: &str, done: u64, total: u64) {
        let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let line = format!(
            "{disk}: {pct:3}% {} / {} ({}/s)",
            crate::plan::human(done),
            crate::plan::human(total),
            crate::plan::human((done as f64 / secs) as u64)
        );
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r{line}");
            if done >= total {
                let _ = writeln!(err);
            }
        } else if pct / 10 > self.last_tenth || done >= total {
            self.last_tenth = pct / 10;
            let _ = writeln!(err, "{line}");
        }
    }
}

/// Uploads `source` into OverlayDisk `disk`, resuming from the server's offset.
/// Returns the bytes sent in this run.
pub async fn upload(
    endpoint: &impl UploadEndpoint,
    disk: &str,
    source: &DiskLocation,
    tuning: Tuning,
    progress: &mut Progress,
) -> Result<u64> {
    let total = source.size();
    let mut sent = 0u64;
    let mut failures = 0u32;
    let mut offset = endpoint.offset(disk).await?;
    // Refusals end the upload; everything else is retried from the server's offset.
    loop {
        if offset > total {
            return Err(failed(
                disk,
                format!("server holds {offset} bytes, more than the {total} of the file"),
            ));
        }
        progress.report(disk, offset, total);
        if offset == total {
            return Ok(sent);
        }
        let chunk = read_chunk(source, offset, tuning.chunk_bytes, total)?;
        let len = chunk.len() as u64;
        match endpoint.put(disk, offset, total, chunk).await {
            Ok(new_offset) => {
                failures = 0;
                sent += len;
                offset = new_offset;
            }
            Err(e @ CliError::UploadRefused { .. }) => return Err(e),
            Err(e) => {
                failures += 1;
                if failures > tuning.max_retries {
                    return Err(e);
                }
                let wait = tuning
                    .backoff
                    .saturating_mul(1 << (failures - 1).min(5))
                    .min(Duration::from_secs(10));
                eprintln!(
                    "{e}; retrying in {wait:?} ({failures}/{})",
                    tuning.max_retries
                );
                tokio::time::sleep(wait).await;
                // The server may have stored part of the failed chunk: ask, don't assume.
                match endpoint.offset(disk).await {
                    Ok(o) => offset = o,
                    Err(e2) if failures >= tuning.max_retries => return Err(e2),
                    Err(_) => {}
                }
            }
        }
    }
}

fn read_chunk(source: &DiskLocation, offset: u64, max: usize, total: u64) -> Result<Vec<u8>> {
    let want = usize::try_from((total - offset).min(max as u64)).unwrap_or(max);
    let mut buf = vec![0u8; want];
    // A CLI uploads one disk at a time; a blocking read of one chunk is fine here.
    source
        .open_at(offset)?
        .read_exact(&mut buf)
        .map_err(|e| failed("disk file", format!("read at {offset}: {e}")))?;
    Ok(buf)
}

#[cfg(test)]
mod tests;
