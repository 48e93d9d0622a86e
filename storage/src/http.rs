//! Resumable HTTP(S) download: a partial file is continued with `Range: bytes=N-`; a
//! server that ignores the range (200) restarts it; dropped connections are retried.
use std::io::Write;
use std::path::Path;

use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};

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

/// Downloads `url` into `part`, continuing what `part` already holds.
pub async fn download_resumable(
    url: &str,
    part: &Path,
    limit: u64,
    attempts: u32,
    ca_pem: Option<&[u8]>,
    progress: Option<&ProgressFn>,
) -> Result<u64> {
    let err = |reason: String| StorageError::Download {
        url: url.to_string(),
        reason,
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(err("only http:// and https:// URLs are supported".into()));
    }
    let mut builder =
        reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(30));
    if let Some(pem) = ca_pem {
        for cert in reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| err(format!("bad CA certificate PEM: {e}")))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    let client = builder.build().map_err(|e| err(e.to_string()))?;
    let mut last_error = String::new();
    for attempt in 0..attempts.max(1) {
        if attempt > 0 {
            tracing::warn!(url, attempt, error = %last_error, "download interrupted, resuming");
            tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt))).await;
        }
        match download_once(&client, url, part, limit, progress).await {
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

async fn download_once(
    client: &reqwest::Client,
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
    let mut req = client.get(url);
    if have > 0 {
        req = req.header(RANGE, format!("bytes={have}-"));
    }
    let resp = req
        .send()
        .await
        .map_err(|e| Attempt::Retry(error_chain(&e)))?;
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
