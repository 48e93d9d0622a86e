//! An async QMP client: greeting and capability negotiation, request ids, replies
//! matched to requests, events broadcast to subscribers, timeouts, error replies
//! mapped to `VmmError::QmpCommand`.

use crate::{Result, VmmError};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, broadcast, oneshot, watch};

/// An asynchronous QMP event.
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `SHUTDOWN`, `STOP`, `RESUME`, `RESET`.
    pub event: String,
    /// Event data (`{}` when absent).
    pub data: Value,
    /// QEMU's timestamp in seconds.
    pub timestamp: f64,
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;
type Reply = std::result::Result<Value, (String, String)>;

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    next_id: AtomicU64,
    timeout: Duration,
    path: PathBuf,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(rename = "return")]
    ret: Option<Value>,
    error: Option<WireError>,
    event: Option<String>,
    data: Option<Value>,
    timestamp: Option<WireTs>,
    id: Option<Value>,
    #[serde(rename = "QMP")]
    greeting: Option<Value>,
}

#[derive(Deserialize)]
struct WireError {
    class: String,
    desc: String,
}

#[derive(Deserialize)]
struct WireTs {
    seconds: i64,
    microseconds: i64,
}

impl QmpClient {
    /// Connects to `path`, retrying while the socket does not exist yet (QEMU starting),
    /// reads the greeting and leaves negotiation mode. `timeout` bounds the whole
    /// connect and, later, each command.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline && is_not_ready(&e) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(source) => {
                    return Err(VmmError::Connect {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let left = deadline.saturating_duration_since(Instant::now());
        let greeting = tokio::time::timeout(left, lines.next_line())
            .await
            .map_err(|_| timeout_err("the QMP greeting", timeout))?
            .map_err(|e| VmmError::QmpProtocol(format!("reading greeting: {e}")))?
            .ok_or_else(|| VmmError::QmpProtocol("connection closed before the greeting".into()))?;
        let wire: Wire = serde_json::from_str(&greeting)
            .map_err(|e| VmmError::QmpProtocol(format!("bad greeting {greeting:?}: {e}")))?;
        if wire.greeting.is_none() {
            return Err(VmmError::QmpProtocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(256);
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(read_loop(lines, pending.clone(), events.clone(), closed_tx));
        let client = Self {
            writer: Mutex::new(write),
            pending,
            events,
            closed,
            next_id: AtomicU64::new(1),
            timeout,
            path: path.to_path_buf(),
        };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// Subscribes to events emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// True once QEMU closed the connection (it exited or was killed).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Waits until the connection closes.
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        // An error means the reader task is gone, which is also "closed".
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Runs a command with the default timeout.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_timeout(command, arguments, self.timeout).await
    }

    /// Runs a command; its error reply becomes `VmmError::QmpCommand`.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        if self.is_closed() {
            return Err(VmmError::QmpProtocol(format!(
                "{}: connection closed",
                self.path.display()
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"execute": command, "id": id});
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let mut line = msg.to_string();
        line.push('\n');
        let write = async {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await
        };
        if let Err(e) = write.await {
            lock(&self.pending).remove(&id);
            return Err(VmmError::QmpProtocol(format!("sending {command}: {e}")));
        }
        let reply = tokio::time::timeout(timeout, rx).await;
        lock(&self.pending).remove(&id);
        match reply {
            Err(_) => Err(timeout_err(&format!("the reply to {command}"), timeout)),
            Ok(Err(_)) => Err(VmmError::QmpProtocol(format!(
                "connection closed while running {command}"
            ))),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(VmmError::QmpCommand {
                command: command.to_string(),
                class,
                desc,
            }),
        }
    }

    /// `query-status`: the run state (`running`, `paused`, `postmigrate`, `shutdown` ...).
    pub async fn run_state(&self) -> Result<String> {
        let v = self.execute("query-status", None).await?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| VmmError::QmpProtocol(format!("query-status returned {v}")))
    }
}

/// Waits for the first event named `name` on `rx`.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<QmpEvent>,
    name: &str,
    timeout: Duration,
) -> Result<QmpEvent> {
    let fut = async {
        loop {
            match rx.recv().await {
                Ok(ev) if ev.event == name => return Ok(ev),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(VmmError::QmpProtocol(format!(
                        "connection closed while waiting for {name}"
                    )));
                }
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| timeout_err(&format!("QMP event {name}"), timeout))?
}

fn is_not_ready(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

fn timeout_err(what: &str, d: Duration) -> VmmError {
    VmmError::Timeout {
        what: what.to_string(),
        secs: d.as_secs_f64(),
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned map only means another task panicked mid-insert; the map is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(wire) = serde_json::from_str::<Wire>(&line) else {
            tracing::warn!(%line, "unparsable QMP line");
            continue;
        };
        if let Some(event) = wire.event {
            let timestamp = wire
                .timestamp
                .map_or(0.0, |t| t.seconds as f64 + t.microseconds as f64 / 1e6);
            let data = wire.data.unwrap_or_else(|| json!({}));
            // No subscribers is fine: nobody is waiting for events right now.
            let _ = events.send(QmpEvent {
                event,
                data,
                timestamp,
            });
            continue;
        }
        let Some(id) = wire.id.as_ref().and_then(Value::as_u64) else {
            continue;
        };
        let reply = match (wire.ret, wire.error) {
            (_, Some(e)) => Err((e.class, e.desc)),
            (Some(v), None) => Ok(v),
            (None, None) => Ok(Value::Null),
        };
        if let Some(tx) = lock(&pending).remove(&id) {
            // The caller may have timed out and gone; dropping the reply is then right.
            let _ = tx.send(reply);
        }
    }
    lock(&pending).clear();
    let _ = closed.send(true);
}
