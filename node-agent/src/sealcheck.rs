//! A launcher boots only a launch spec hvx sealed (`hvx_api::seal`). The launcher
//! reads its spec from its pod's annotation, which any user with `edit` in the
//! namespace can change before the container starts, and holds no key (its pod is
//! the tenant's to read). So it asks its node's agent, which holds the key: over a
//! Unix socket in the node's run dir (`NodePaths::seal_socket`), one JSON line each
//! way. The socket is a yes/no oracle and tells nothing about the key. The same
//! socket hands a launcher its VM's tap fds (`crate::tapfd`).

use hvx_api::seal::{SealKey, Sealed, Subject};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Largest request read (a launch spec is a few KiB).
const MAX_REQUEST: u64 = 1 << 20;

/// What a launcher asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealCheck {
    /// Its pod's namespace (downward API).
    pub namespace: String,
    /// Its pod's name (downward API).
    pub pod: String,
    /// The uid of the VmApplication its pod belongs to (set by the operator in the
    /// pod's container spec, which nobody can change after creation).
    pub owner_uid: String,
    /// The launch spec exactly as read.
    pub spec: String,
    /// The spec's seal as read (empty: none).
    pub seal: String,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealAnswer {
    /// The spec is hvx's, for this pod.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer to `req` under `key` (None: this agent was started without one). Pure.
pub fn answer(key: Option<&SealKey>, req: &SealCheck) -> SealAnswer {
    let Some(key) = key else {
        return SealAnswer {
            ok: false,
            reason: Some("the node agent has no seal key (--seal-key-file)".into()),
        };
    };
    let subject = Subject {
        namespace: &req.namespace,
        pod: &req.pod,
        owner_uid: &req.owner_uid,
    };
    let seal = Some(req.seal.as_str()).filter(|s| !s.is_empty());
    match key.verify(&subject, Sealed::LaunchSpec, &req.spec, seal) {
        Ok(()) => SealAnswer {
            ok: true,
            reason: None,
        },
        Err(e) => SealAnswer {
            ok: false,
            reason: Some(e.to_string()),
        },
    }
}

/// Serves checks on `path` until the task is dropped (a stale socket file from an
/// earlier agent is replaced), and tap requests (`tapfd`) with the default policy.
pub async fn serve(path: &Path, key: Option<SealKey>) -> std::io::Result<()> {
    serve_with(path, key, crate::tapfd::TapPolicy::default()).await
}

/// [`serve`] with the tap policy given (where callers' cgroups, pods and taps are).
pub async fn serve_with(
    path: &Path,
    key: Option<SealKey>,
    policy: crate::tapfd::TapPolicy,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let shared = std::sync::Arc::new((key, policy));
    loop {
        let (sock, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(sock, shared).await {
                tracing::debug!(error = %e, "launch spec check");
            }
        });
    }
}

async fn serve_one(
    mut sock: UnixStream,
    shared: std::sync::Arc<(Option<SealKey>, crate::tapfd::TapPolicy)>,
) -> std::io::Result<()> {
    let mut line = String::new();
    {
        let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(&mut sock, MAX_REQUEST));
        tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    }
    let key = shared.0.as_ref();
    // A tap request is a seal check with a `taps` field.
    if let Ok(req) = serde_json::from_str::<crate::tapfd::TapRequest>(&line) {
        // The kernel's word on who is asking, not the request's.
        let pid = sock.peer_cred().ok().and_then(|c| c.pid());
        let shared2 = shared.clone();
        let req2 = req.clone();
        let (answer, fds) = tokio::task::spawn_blocking(move || {
            crate::tapfd::answer(shared2.0.as_ref(), &shared2.1, &req2, pid)
        })
        .await
        .map_err(std::io::Error::other)?;
        if !answer.ok {
            tracing::warn!(namespace = %req.check.namespace, pod = %req.check.pod, ?pid, reason = ?answer.reason, "refused a launcher's taps");
        }
        // The agent's copies of the fds close once sent (or on error).
        return crate::tapfd::reply(&sock, &answer, &fds).await;
    }
    let reply = match serde_json::from_str::<SealCheck>(&line) {
        Ok(req) => {
            let a = answer(key, &req);
            if !a.ok {
                tracing::warn!(namespace = %req.namespace, pod = %req.pod, reason = ?a.reason, "refused a launcher's launch spec");
            }
            a
        }
        Err(e) => SealAnswer {
            ok: false,
            reason: Some(format!("unreadable request: {e}")),
        },
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    sock.write_all(&out).await
}

/// Asks the agent at `path`; retries while it is not there (an agent restarting)
/// until `wait` passed.
pub async fn ask(path: &Path, req: &SealCheck, wait: Duration) -> Result<SealAnswer, String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match ask_once(path, req).await {
            Ok(a) => return Ok(a),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!(
                    "the node agent did not answer at {} within {}s: {e}",
                    path.display(),
                    wait.as_secs()
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn ask_once(path: &Path, req: &SealCheck) -> std::io::Result<SealAnswer> {
    let sock = UnixStream::connect(path).await?;
    let (read, mut write) = sock.into_split();
    let mut out = serde_json::to_vec(req)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(read).read_line(&mut line),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    Ok(serde_json::from_str(&line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SealKey {
        SealKey::new(b"0123456789abcdef0123456789abcdef")
    }

    fn request(spec: &str) -> SealCheck {
        let subject = Subject {
            namespace: "prod",
            pod: "shop-web",
            owner_uid: "u-1",
        };
        SealCheck {
            namespace: "prod".into(),
            pod: "shop-web".into(),
            owner_uid: "u-1".into(),
            spec: spec.into(),
            seal: key().seal(&subject, Sealed::LaunchSpec, "{\"vmId\":\"u-1/web\"}"),
        }
    }

    #[test]
    fn only_the_sealed_spec_of_this_pod_passes() {
        assert!(answer(Some(&key()), &request("{\"vmId\":\"u-1/web\"}")).ok);
        let edited = answer(Some(&key()), &request("{\"vmId\":\"u-9/db\"}"));
        assert!(!edited.ok);
        assert!(
            edited
                .reason
                .as_deref()
                .unwrap_or_default()
                .contains("does not match"),
            "{edited:?}"
        );
        let mut other_pod = request("{\"vmId\":\"u-1/web\"}");
        other_pod.pod = "shop-db".into();
        assert!(!answer(Some(&key()), &other_pod).ok);
        let mut unsealed = request("{\"vmId\":\"u-1/web\"}");
        unsealed.seal.clear();
        assert!(!answer(Some(&key()), &unsealed).ok);
        assert!(!answer(None, &request("{\"vmId\":\"u-1/web\"}")).ok);
    }

    #[tokio::test]
    async fn a_launcher_gets_its_answer_over_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node/seal.sock");
        let server = tokio::spawn({
            let path = path.clone();
            async move { serve(&path, Some(key())).await }
        });
        let ok = ask(
            &path,
            &request("{\"vmId\":\"u-1/web\"}"),
            Duration::from_secs(5),
        )
        .await
        .expect("answer");
        assert!(ok.ok, "{ok:?}");
        let no = ask(&path, &request("{}"), Duration::from_secs(5))
            .await
            .expect("answer");
        assert!(!no.ok);
        server.abort();
        let gone = ask(
            &dir.path().join("absent.sock"),
            &request("{}"),
            Duration::from_millis(600),
        )
        .await;
        assert!(gone.is_err());
    }
}
