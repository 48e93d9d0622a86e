//! Runs every controller until shutdown.

use crate::context::{Context, OperatorConfig};
use crate::error::Error;
use futures::StreamExt;
use hvx_api::{OverlayDisk, VirtualNetwork, VmApplication};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client};
use std::sync::Arc;
use std::time::Duration;

fn error_policy<K>(_obj: Arc<K>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(kind = err.kind(), error = %err, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs one reconcile and records it in the metrics.
async fn timed(
    ctx: Arc<Context>,
    controller: &'static str,
    f: impl std::future::Future<Output = Result<Action, Error>>,
) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let r = f.await;
    ctx.metrics.reconcile(
        controller,
        started.elapsed(),
        r.as_ref().err().map(Error::kind),
    );
    r
}

fn log_result<T: std::fmt::Debug, E: std::fmt::Display>(r: Result<T, E>) {
    match r {
        Ok(obj) => tracing::debug!(?obj, "reconciled"),
        Err(e) => tracing::debug!(error = %e, "reconcile error"),
    }
}

/// The VirtualNetworks a launcher pod's VM is attached to.
fn networks_of_pod(pod: Pod) -> Vec<ObjectRef<VirtualNetwork>> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    crate::hostplan::pod_launch_spec(&pod)
        .map(|ls| {
            ls.vm
                .nics
                .iter()
                .map(|n| ObjectRef::new(&n.network.name).within(&ns))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the VmApplication, VirtualNetwork and OverlayDisk controllers until a
/// shutdown signal (or until the returned future is dropped).
pub async fn run(client: Client, config: OperatorConfig, instance: Option<String>) {
    run_with_metrics(client, config, instance, Arc::default()).await;
}

/// `run`, recording into `metrics`.
pub async fn run_with_metrics(
    client: Client,
    config: OperatorConfig,
    instance: Option<String>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let ctx = Arc::new(Context::with_metrics(
        client.clone(),
        config,
        Reporter {
            controller: "hvx-operator".into(),
            instance,
        },
        metrics,
    ));
    tracing::info!(config = ?ctx.config, "controllers starting");
    let apps = Controller::new(
        Api::<VmApplication>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels("hvx.dev/role=launcher"),
    )
    .shutdown_on_signal()
    .run(
        |o, c| timed(c.clone(), "vmapp", crate::vmapp::reconcile(o, c)),
        error_policy,
        ctx.clone(),
    )
    .for_each(|r| async move { log_result(r) });
    let nets = Controller::new(
        Api::<VirtualNetwork>::all(client.clone()),
        watcher::Config::default(),
    )
    // A VM pod bound, started or gone changes its networks' per-node state.
    .watches(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels("hvx.dev/role=launcher"),
        networks_of_pod,
    )
    .shutdown_on_signal()
    .run(
        |o, c| timed(c.clone(), "network", crate::network::reconcile(o, c)),
        error_policy,
        ctx.clone(),
    )
    .for_each(|r| async move { log_result(r) });
    let disks = Controller::new(
        Api::<OverlayDisk>::all(client.clone()),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(
        |o, c| timed(c.clone(), "disk", crate::disk::reconcile(o, c)),
        error_policy,
        ctx.clone(),
    )
    .for_each(|r| async move { log_result(r) });
    let migrations = Controller::new(
        Api::<hvx_api::migration::VmMigration>::all(client.clone()),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(
        |o, c| timed(c.clone(), "migration", crate::migration::reconcile(o, c)),
        error_policy,
        ctx.clone(),
    )
    .for_each(|r| async move { log_result(r) });
    // Cordoned nodes -> VmMigrations for their VMs (kubectl drain).
    let drains = Controller::new(
        Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(
        |o, c| timed(c.clone(), "drain", crate::drain::reconcile(o, c)),
        error_policy,
        ctx.clone(),
    )
    .for_each(|r| async move { log_result(r) });
    // The sweep has no end of its own: it stops with the controllers (shutdown signal).
    let controllers = async {
        futures::join!(apps, nets, disks, migrations, drains);
    };
    tokio::select! {
        () = controllers => {}
        () = crate::sweep::run(ctx.clone()) => {}
    }
}
