//! Operator at scale: memory and reconcile latency with N (default 1000)
//! VmApplications, against the cluster `$KUBECONFIG` names (CRDs installed here).
//!
//! The operator binary runs as a child process (so its RSS is its own) with plaintext
//! agents and no agent nodes; the applications use `runStrategy: Halted`, so each
//! reconcile is the full pipeline (fetch, validate, resolve, status write) without
//! creating pods. Latency = create call returned -> status.observedGeneration seen by
//! a watch. Baselines measured in the same run: the operator's RSS with no objects,
//! and the API server's own create latency for the same objects. Then the operator is
//! stopped, every application's spec changed (a new generation), and a new operator
//! started: the time until every status shows the new generation is how long a
//! restarted (or newly elected) operator takes to settle them all.
//!
//! `cargo run --release -p hvx-e2e --example operator_bench -- [N]` with
//! `HVX_OPERATOR_BIN` naming the operator binary (default `target/debug/hvx-operator`;
//! `bench/cluster/run.sh` uses release builds); prints `BENCH {json}` lines, and to
//! stderr the API server's watch delivery time (twice in every reconcile latency).
//! `HVX_BENCH_METRICS=127.0.0.1:PORT` serves the operator's metrics while it runs.

use futures::{StreamExt, TryStreamExt};
use hvx_api::VmApplication;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use std::collections::HashMap;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const NS: &str = "hvx-bench-operator";

fn rss_kib(child: &Child) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn bench_line(metric: &str, unit: &str, value: f64, baseline: &str, base: f64) {
    let ratio = if base > 0.0 { value / base } else { 0.0 };
    println!(
        "BENCH {}",
        json!({"group": "operator", "metric": metric, "unit": unit,
               "value": (value * 1000.0).round() / 1000.0, "baseline": baseline,
               "baseline_value": (base * 1000.0).round() / 1000.0,
               "ratio": (ratio * 100.0).round() / 100.0})
    );
}

fn app(i: usize) -> serde_json::Value {
    json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
        "metadata": {"name": format!("app-{i:04}")},
        "spec": {"vms": [{
            "name": "vm", "cpu": {"sockets": 1, "coresPerSocket": 1}, "memoryMib": 256,
            "runStrategy": "Halted",
            "disks": [{"name": "root", "overlayDisk": {"name": "root"}, "controller": "pvscsi", "unit": 0}],
            "nics": [{"name": "ethernet0", "network": {"name": "net"},
                      "macAddress": format!("00:50:56:{:02x}:{:02x}:01", i / 256, i % 256)}]
        }]}
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let client = kube::Client::try_default().await?;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for (_, crd) in hvx_api::all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(
            &name,
            &PatchParams::apply("hvx-bench").force(),
            &Patch::Apply(&crd),
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let _ = nss.delete(NS, &DeleteParams::default()).await;
    for _ in 0..240 {
        if nss.get_opt(NS).await?.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
    )
    .await?;

    let bin = std::env::var("HVX_OPERATOR_BIN").unwrap_or_else(|_| {
        let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        format!("{dir}/debug/hvx-operator")
    });
    // The operator refuses to start without the key it seals launcher pods with; this
    // run makes no pods, so any key of the right length does.
    let seal_dir = tempfile::tempdir()?;
    let seal_key = seal_dir.path().join("seal-key");
    std::fs::write(&seal_key, "operator-bench-seal-key-0123456789abcdef")?;
    let start_operator = || {
        Command::new(&bin)
            // The leader Lease lives elsewhere: deleting NS at the end must not take
            // it (the operator would lose leadership with the finalizers still on).
            .env("POD_NAMESPACE", "default")
            .env("RUST_LOG", "warn")
            .args([
                "--cpu-millis-per-vcpu",
                "10",
                "--metrics-listen",
                &std::env::var("HVX_BENCH_METRICS").unwrap_or_default(),
                "--seal-key-file",
                &seal_key.display().to_string(),
            ])
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {bin}: {e} (cargo build -p hvx-operator)"))
    };
    let mut op = start_operator()?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    if let Some(exit) = op.try_wait()? {
        anyhow::bail!("the operator exited at start ({exit}); its stderr is above");
    }
    let idle_kib = rss_kib(&op) as f64;

    // Watch for observedGeneration before creating anything.
    let apps: Api<VmApplication> = Api::namespaced(client.clone(), NS);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    // First sight of each application through the watch (the API server's own watch
    // delivery, which every reconcile latency includes twice), for the log.
    let first_seen: std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
    let watch = tokio::spawn({
        let apps = apps.clone();
        let first_seen = first_seen.clone();
        async move {
            let mut s = watcher(apps, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Ok(Some(a)) = s.try_next().await {
                first_seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(a.metadata.name.clone().unwrap_or_default())
                    .or_insert_with(Instant::now);
                if a.status
                    .as_ref()
                    .and_then(|s| s.observed_generation)
                    .is_some()
                {
                    let _ = tx.send((a.metadata.name.unwrap_or_default(), Instant::now()));
                }
            }
        }
    });

    let started = Instant::now();
    let mut created: HashMap<String, Instant> = HashMap::new();
    let mut create_ms = Vec::new();
    let objs: Vec<VmApplication> = (0..n)
        .map(|i| serde_json::from_value(app(i)))
        .collect::<Result<_, _>>()?;
    let create_started = Instant::now();
    let results: Vec<_> = futures::stream::iter(objs)
        .map(|o| {
            let apps = apps.clone();
            async move {
                let t = Instant::now();
                let r = apps.create(&PostParams::default(), &o).await;
                (o.metadata.name.unwrap_or_default(), t, Instant::now(), r)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let create_total = create_started.elapsed().as_secs_f64();
    for (name, t0, t1, r) in results {
        r?;
        create_ms.push((t1 - t0).as_secs_f64() * 1000.0);
        created.insert(name, t1);
    }
    let mut latency_ms = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < n && Instant::now() < deadline {
        if let Ok(Some((name, at))) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await
            && seen.insert(name.clone())
            && let Some(c) = created.get(&name)
        {
            latency_ms.push(at.saturating_duration_since(*c).as_secs_f64() * 1000.0);
        }
    }
    let all_done = started.elapsed().as_secs_f64();
    {
        let seen_at = first_seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut delivery: Vec<f64> = created
            .iter()
            .filter_map(|(name, c)| {
                Some(
                    seen_at
                        .get(name)?
                        .saturating_duration_since(*c)
                        .as_secs_f64()
                        * 1000.0,
                )
            })
            .collect();
        delivery.sort_by(f64::total_cmp);
        eprintln!(
            "watch delivery after the create returned: p50 {:.0} ms, p95 {:.0} ms",
            pct(&delivery, 0.5),
            pct(&delivery, 0.95)
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let loaded_kib = rss_kib(&op) as f64;
    watch.abort();
    let _ = op.kill();
    let _ = op.wait();
    anyhow::ensure!(
        seen.len() == n,
        "only {} of {n} applications were reconciled within 600 s",
        seen.len()
    );

    // A restarted operator with every application changed while it was away.
    let names: Vec<String> = created.keys().cloned().collect();
    let patched: Vec<_> = futures::stream::iter(names)
        .map(|name| {
            let apps = apps.clone();
            async move {
                let patch = json!({"spec": {"vms": [{
                    "name": "vm", "cpu": {"sockets": 1, "coresPerSocket": 1}, "memoryMib": 512,
                    "runStrategy": "Halted",
                    "disks": [{"name": "root", "overlayDisk": {"name": "root"}, "controller": "pvscsi", "unit": 0}],
                    "nics": [{"name": "ethernet0", "network": {"name": "net"},
                              "macAddress": mac_of(&name)}]
                }]}});
                apps.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|a| a.metadata.generation.unwrap_or_default())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let target_generation = patched
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .max()
        .unwrap_or(2);
    let restarted = Instant::now();
    let mut op = start_operator()?;
    let mut settled = None;
    while restarted.elapsed() < Duration::from_secs(600) {
        let list = apps.list(&Default::default()).await?;
        let done = list
            .items
            .iter()
            .filter(|a| {
                a.status.as_ref().and_then(|s| s.observed_generation) == Some(target_generation)
            })
            .count();
        if done == n {
            settled = Some(restarted.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Deleted while an operator runs, so the finalizers go.
    let _ = nss.delete(NS, &DeleteParams::default()).await;
    for _ in 0..600 {
        if nss.get_opt(NS).await?.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = op.kill();
    let _ = op.wait();
    let settled = settled.ok_or_else(|| {
        anyhow::anyhow!("a restarted operator did not settle {n} changed applications within 600 s")
    })?;
    latency_ms.sort_by(f64::total_cmp);
    create_ms.sort_by(f64::total_cmp);
    eprintln!("{n} applications reconciled in {all_done:.1}s");
    bench_line(
        &format!("operator RSS with {n} VmApplications"),
        "MiB",
        loaded_kib / 1024.0,
        "operator RSS, no objects",
        idle_kib / 1024.0,
    );
    bench_line(
        &format!("reconcile latency p50 ({n} created at once)"),
        "ms",
        pct(&latency_ms, 0.5),
        "API server create latency p50",
        pct(&create_ms, 0.5),
    );
    bench_line(
        &format!("reconcile latency p95 ({n} created at once)"),
        "ms",
        pct(&latency_ms, 0.95),
        "API server create latency p95",
        pct(&create_ms, 0.95),
    );
    bench_line(
        &format!("restarted operator settles {n} changed applications"),
        "s",
        settled,
        "creating them through the API server",
        create_total,
    );
    Ok(())
}

/// The MAC `app(i)` gave the application named `name`.
fn mac_of(name: &str) -> String {
    let i: usize = name.trim_start_matches("app-").parse().unwrap_or_default();
    format!("00:50:56:{:02x}:{:02x}:01", i / 256, i % 256)
}
