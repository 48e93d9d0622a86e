//! Resumable HTTP(S) download: a partial file is continued with `Range: bytes=N-`; a
//! server that ignores the range (200) restarts it; dropped connections are retried.
//! Every hop's address is checked by the egress policy (`crate::egress`) and pinned;
//! redirects are followed here, not by the client, so each one is checked too.
use std::io::Write;
use std::path::Path;

use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};

use crate::egress::HttpPolicy;
use crate::error::{Result, StorageError, io_err};
use crate::store::{ImportPhase, ProgressFn};

/// An error with its causes ("error sending request: ... : invalid peer certificate").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Total length from a `Content-Range: bytes a-b/total` header.
pub fn content_range_total(value: &str) -> Option<u64> {
    value.rsplit('/').next().and_then(|t| t.trim().parse().ok())
}

/// Downloads `url` into `part`, continuing what `part` already holds, from addresses
/// `policy` allows.
pub async fn download_resumable(
    url: &str,
    part: &Path,
    limit: u64,
    attempts: u32,
    ca_pem: Option<&[u8]>,
    policy: &HttpPolicy,
    progress: Option<&ProgressFn>,
) -> Result<u64> {
    let err = |reason: String| StorageError::Download {
        url: url.to_string(),
        reason,
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(err("only http:// and https:// URLs are supported".into()));
    }
    let roots = match ca_pem {
        Some(pem) => reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| err(format!("bad CA certificate PEM: {e}")))?,
        None => Vec::new(),
    };
    let fetch = Fetch { roots, policy };
    let mut last_error = String::new();
    for attempt in 0..attempts.max(1) {
        if attempt > 0 {
            tracing::warn!(url, attempt, error = %last_error, "download interrupted, resuming");
            tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt))).await;
        }
        match download_once(&fetch, url, part, limit, progress).await {
            Ok(len) => return Ok(len),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(reason)) => last_error = reason,
        }
    }
    Err(err(format!(
        "gave up after {attempts} attempts: {last_error}"
    )))
}

enum Attempt {
    Fatal(StorageError),
    Retry(String),
}

/// How each hop is fetched: extra CA roots and the egress policy.
struct Fetch<'a> {
    roots: Vec<reqwest::Certificate>,
    policy: &'a HttpPolicy,
}

impl Fetch<'_> {
    /// GETs `url`, following redirects by hand: each hop's host resolved once, checked
    /// and connected to at that address (a client per hop, pinned with `resolve`).
    async fn get(
        &self,
        url: &str,
        range_from: u64,
    ) -> std::result::Result<reqwest::Response, Attempt> {
        let fatal = |reason: String| {
            Attempt::Fatal(StorageError::Download {
                url: url.to_string(),
                reason,
            })
        };
        let mut hop = reqwest::Url::parse(url).map_err(|e| fatal(format!("bad URL: {e}")))?;
        for hops in 0..=self.policy.max_redirects {
            if !matches!(hop.scheme(), "http" | "https") {
                return Err(fatal(format!(
                    "redirected to {hop}: only http:// and https:// are followed"
                )));
            }
            let mut builder = reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(30))
                .redirect(reqwest::redirect::Policy::none())
                // A proxy from the environment would connect somewhere unchecked.
                .no_proxy();
            for cert in &self.roots {
                builder = builder.add_root_certificate(cert.clone());
            }
            // The operator's upload Service: trusted on the first hop only.
            if !(hops == 0 && self.policy.trusted(&hop)) {
                let addr = crate::egress::resolve_checked(self.policy, &hop)
                    .await
                    .map_err(fatal)?;
                let (host, _) = crate::egress::host_port(&hop).map_err(fatal)?;
                if host.parse::<std::net::IpAddr>().is_err() {
                    builder = builder.resolve(&host, addr);
                }
            }
            let client = builder.build().map_err(|e| fatal(e.to_string()))?;
            let mut req = client.get(hop.clone());
            if range_from > 0 {
                req = req.header(RANGE, format!("bytes={range_from}-"));
            }
            let resp = req
                .send()
                .await
                .map_err(|e| Attempt::Retry(error_chain(&e)))?;
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let Some(next) = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
            else {
                return Ok(resp);
            };
            hop = hop
                .join(next)
                .map_err(|e| fatal(format!("bad redirect Location {next:?}: {e}")))?;
            tracing::debug!(url, to = %hop, "following redirect");
        }
        Err(fatal(format!(
            "more than {} redirects",
            self.policy.max_redirects
        )))
    }
}

async fn download_once(
    fetch: &Fetch<'_>,
    url: &str,
    part: &Path,
    limit: u64,
    progress: Option<&ProgressFn>,
) -> std::result::Result<u64, Attempt> {
    let fatal = |reason: String| {
        Attempt::Fatal(StorageError::Download {
            url: url.to_string(),
            reason,
        })
    };
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let resp = fetch.get(url, have).await?;
    let status = resp.status();
    let (mut done, total, append) = match status {
        StatusCode::PARTIAL_CONTENT => {
            let total = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range_total);
            (have, total, true)
        }
        StatusCode::OK => (0, resp.content_length(), false),
        StatusCode::RANGE_NOT_SATISFIABLE if have > 0 => {
            // What we hold is already everything (Content-Range: bytes */N with N == have).
            let total = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range_total);
            if total == Some(have) {
                return Ok(have);
            }
            let _ = std::fs::remove_file(part);
            return Err(Attempt::Retry("range not satisfiable; restarting".into()));
        }
        s if s.is_server_error() => return Err(Attempt::Retry(format!("HTTP {s}"))),
        s => return Err(fatal(format!("HTTP {s}"))),
    };
    if let Some(t) = total
        && t > limit
    {
        return Err(Attempt::Fatal(StorageError::TooLarge {
            path: part.to_path_buf(),
            what: "download",
            value: t,
            limit,
        }));
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(part)
        .map_err(|e| Attempt::Fatal(io_err(part)(e)))?;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Attempt::Retry(error_chain(&e)))?;
        file.write_all(&chunk)
            .map_err(|e| Attempt::Fatal(io_err(part)(e)))?;
        done += chunk.len() as u64;
        if done > limit {
            return Err(Attempt::Fatal(StorageError::TooLarge {
                path: part.to_path_buf(),
                what: "download",
                value: done,
                limit,
            }));
        }
        if let Some(p) = progress {
            p(ImportPhase::Fetching, done, total.unwrap_or(done));
        }
    }
    file.sync_all()
        .map_err(|e| Attempt::Fatal(io_err(part)(e)))?;
    match total {
        Some(t) if t != done => Err(Attempt::Retry(format!(
            "connection closed at {done} of {t} bytes"
        ))),
        _ => Ok(done),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_range() {
        assert_eq!(content_range_total("bytes 100-199/200"), Some(200));
        assert_eq!(content_range_total("bytes */200"), Some(200));
        assert_eq!(content_range_total("bytes 0-1/*"), None);
    }
}
