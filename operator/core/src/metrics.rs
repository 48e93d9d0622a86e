//! Prometheus text on `/metrics` and liveness on `/healthz` (tiny HTTP/1.1, two GET
//! paths): reconciles per controller with their error kinds and durations, and live
//! migrations with their outcomes and downtime.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Counters of this process.
#[derive(Debug, Default)]
pub struct Metrics {
    /// (controller, result: `ok` or the error kind) -> count.
    reconciles: Mutex<BTreeMap<(String, String), u64>>,
    /// controller -> (seconds sum, count).
    durations: Mutex<BTreeMap<String, (f64, u64)>>,
    /// outcome (`completed`, `failed`) -> count.
    migrations: Mutex<BTreeMap<String, u64>>,
    /// (downtime ms sum, total ms sum, completed count).
    migration_times: Mutex<(u64, u64, u64)>,
    /// Cold disk moves: outcome -> count, and bytes moved.
    disk_moves: Mutex<(BTreeMap<String, u64>, u64)>,
    /// Agent calls: (rpc, gRPC code) -> count; rpc -> (seconds sum, count).
    agent_calls: Mutex<AgentCalls>,
    /// Cleanup entries owed to lost nodes, by node (`owed`).
    owed: Mutex<BTreeMap<String, u64>>,
    /// Gauges read from the operator's caches at scrape time.
    cache_gauges: Mutex<Option<GaugeSource>>,
}

/// What the caches say at scrape time (VMs by phase, migrations in progress).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheGauges {
    /// VMs of every application by phase (`Pending` when the status has none yet).
    pub vms_by_phase: BTreeMap<String, u64>,
    /// VmMigrations not yet Completed, Failed or Cancelled.
    pub migrations_in_progress: u64,
    /// Age of the oldest of them, seconds (0 when none).
    pub oldest_migration_seconds: f64,
}

/// Computes [`CacheGauges`] (a closure over the caches).
pub struct GaugeSource(Arc<dyn Fn() -> CacheGauges + Send + Sync>);

impl std::fmt::Debug for GaugeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GaugeSource")
    }
}

/// Agent calls: (rpc, gRPC code) -> count; rpc -> (seconds sum, count).
type AgentCalls = (
    BTreeMap<(&'static str, String), u64>,
    BTreeMap<&'static str, (f64, u64)>,
);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Metrics {
    /// Records one reconcile.
    pub fn reconcile(&self, controller: &str, took: Duration, error_kind: Option<&str>) {
        *lock(&self.reconciles)
            .entry((controller.into(), error_kind.unwrap_or("ok").into()))
            .or_default() += 1;
        let mut d = lock(&self.durations);
        let e = d.entry(controller.into()).or_default();
        e.0 += took.as_secs_f64();
        e.1 += 1;
    }

    /// Records a finished migration.
    pub fn migration(&self, completed: bool, downtime_ms: u64, total_ms: u64) {
        let outcome = if completed { "completed" } else { "failed" };
        *lock(&self.migrations).entry(outcome.into()).or_default() += 1;
        if completed {
            let mut t = lock(&self.migration_times);
            t.0 += downtime_ms;
            t.1 += total_ms;
            t.2 += 1;
        }
    }

    /// Records a finished cold disk move.
    pub fn disk_move(&self, completed: bool, bytes: u64) {
        let outcome = if completed { "completed" } else { "failed" };
        let mut m = lock(&self.disk_moves);
        *m.0.entry(outcome.into()).or_default() += 1;
        m.1 += bytes;
    }

    /// Records one agent call (after its retries).
    pub fn agent_call(&self, rpc: &'static str, code: tonic::Code, took: Duration) {
        let mut c = lock(&self.agent_calls);
        *c.0.entry((rpc, format!("{code:?}"))).or_default() += 1;
        let d = c.1.entry(rpc).or_default();
        d.0 += took.as_secs_f64();
        d.1 += 1;
    }

    /// Sets the cleanup entries owed to each node (nodes absent owe nothing).
    pub fn owed(&self, by_node: BTreeMap<String, u64>) {
        *lock(&self.owed) = by_node;
    }

    /// Sets where the cache gauges come from (once the caches exist).
    pub fn set_cache_gauges(&self, source: impl Fn() -> CacheGauges + Send + Sync + 'static) {
        *lock(&self.cache_gauges) = Some(GaugeSource(Arc::new(source)));
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let source = lock(&self.cache_gauges).as_ref().map(|s| s.0.clone());
        if let Some(source) = source {
            write_cache_gauges(&mut out, &source());
        }
        let _ = writeln!(out, "# TYPE hvx_operator_reconciles_total counter");
        for ((c, r), n) in lock(&self.reconciles).iter() {
            let _ = writeln!(
                out,
                "hvx_operator_reconciles_total{{controller=\"{c}\",result=\"{r}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# TYPE hvx_operator_reconcile_seconds summary");
        for (c, (sum, n)) in lock(&self.durations).iter() {
            let _ = writeln!(
                out,
                "hvx_operator_reconcile_seconds_sum{{controller=\"{c}\"}} {sum}\nhvx_operator_reconcile_seconds_count{{controller=\"{c}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# TYPE hvx_operator_migrations_total counter");
        for (o, n) in lock(&self.migrations).iter() {
            let _ = writeln!(out, "hvx_operator_migrations_total{{outcome=\"{o}\"}} {n}");
        }
        let (down, total, n) = *lock(&self.migration_times);
        let _ = writeln!(
            out,
            "# TYPE hvx_operator_migration_downtime_ms summary\nhvx_operator_migration_downtime_ms_sum {down}\nhvx_operator_migration_downtime_ms_count {n}"
        );
        let _ = writeln!(
            out,
            "# TYPE hvx_operator_migration_total_ms summary\nhvx_operator_migration_total_ms_sum {total}\nhvx_operator_migration_total_ms_count {n}"
        );
        let moves = lock(&self.disk_moves);
        let _ = writeln!(out, "# TYPE hvx_operator_disk_moves_total counter");
        for (o, n) in &moves.0 {
            let _ = writeln!(out, "hvx_operator_disk_moves_total{{outcome=\"{o}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# TYPE hvx_operator_disk_move_bytes_total counter\nhvx_operator_disk_move_bytes_total {}",
            moves.1
        );
        drop(moves);
        let calls = lock(&self.agent_calls);
        let _ = writeln!(out, "# TYPE hvx_operator_agent_calls_total counter");
        for ((rpc, code), n) in &calls.0 {
            let _ = writeln!(
                out,
                "hvx_operator_agent_calls_total{{rpc=\"{rpc}\",code=\"{code}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# TYPE hvx_operator_agent_call_seconds summary");
        for (rpc, (sum, n)) in &calls.1 {
            let _ = writeln!(
                out,
                "hvx_operator_agent_call_seconds_sum{{rpc=\"{rpc}\"}} {sum}\nhvx_operator_agent_call_seconds_count{{rpc=\"{rpc}\"}} {n}"
            );
        }
        drop(calls);
        let _ = writeln!(out, "# TYPE hvx_operator_owed_cleanup_entries gauge");
        for (node, n) in lock(&self.owed).iter() {
            let _ = writeln!(
                out,
                "hvx_operator_owed_cleanup_entries{{node=\"{node}\"}} {n}"
            );
        }
        out
    }
}

/// The cache gauges in Prometheus text. Every phase is written (0 when none), so a
/// phase's series does not vanish when its last VM leaves it.
fn write_cache_gauges(out: &mut String, g: &CacheGauges) {
    let _ = writeln!(out, "# TYPE hvx_operator_vms gauge");
    let mut phases: BTreeMap<&str, u64> = [
        "Pending",
        "Scheduling",
        "Starting",
        "Running",
        "Migrating",
        "Paused",
        "Stopping",
        "Stopped",
        "Failed",
    ]
    .into_iter()
    .map(|p| (p, 0))
    .collect();
    for (phase, n) in &g.vms_by_phase {
        *phases.entry(phase.as_str()).or_default() += n;
    }
    for (phase, n) in phases {
        let _ = writeln!(out, "hvx_operator_vms{{phase=\"{phase}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# TYPE hvx_operator_migrations_in_progress gauge\nhvx_operator_migrations_in_progress {}",
        g.migrations_in_progress
    );
    let _ = writeln!(
        out,
        "# TYPE hvx_operator_migration_oldest_in_progress_seconds gauge\nhvx_operator_migration_oldest_in_progress_seconds {}",
        g.oldest_migration_seconds
    );
}

/// Serves `/metrics` and `/healthz` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.render()),
                "/healthz" => ("200 OK", "ok\n".to_string()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_gauges_cover_every_phase() {
        let m = Metrics::default();
        assert!(!m.render().contains("hvx_operator_vms"));
        m.set_cache_gauges(|| CacheGauges {
            vms_by_phase: [("Running".to_string(), 3), ("Failed".to_string(), 1)]
                .into_iter()
                .collect(),
            migrations_in_progress: 2,
            oldest_migration_seconds: 42.5,
        });
        let text = m.render();
        assert!(
            text.contains("hvx_operator_vms{phase=\"Running\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("hvx_operator_vms{phase=\"Failed\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("hvx_operator_vms{phase=\"Stopped\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("hvx_operator_migrations_in_progress 2\n"),
            "{text}"
        );
        assert!(
            text.contains("hvx_operator_migration_oldest_in_progress_seconds 42.5\n"),
            "{text}"
        );
    }

    #[test]
    fn renders_counts_by_controller_and_error_kind() {
        let m = Metrics::default();
        m.reconcile("vmapp", Duration::from_millis(500), None);
        m.reconcile("vmapp", Duration::from_millis(250), Some("agent"));
        m.migration(true, 120, 1500);
        m.migration(false, 0, 0);
        m.disk_move(true, 3 << 20);
        m.owed(BTreeMap::from([("n2".to_string(), 3)]));
        let text = m.render();
        assert!(
            text.contains("hvx_operator_owed_cleanup_entries{node=\"n2\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("hvx_operator_disk_moves_total{outcome=\"completed\"} 1")
                && text.contains("hvx_operator_disk_move_bytes_total 3145728"),
            "{text}"
        );
        assert!(
            text.contains("hvx_operator_reconciles_total{controller=\"vmapp\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("hvx_operator_reconciles_total{controller=\"vmapp\",result=\"agent\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("hvx_operator_reconcile_seconds_sum{controller=\"vmapp\"} 0.75"),
            "{text}"
        );
        assert!(
            text.contains("hvx_operator_migrations_total{outcome=\"failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("hvx_operator_migration_downtime_ms_sum 120"),
            "{text}"
        );
    }
}
