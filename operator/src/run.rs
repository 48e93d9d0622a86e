//! Runs every controller until shutdown.

use crate::context::{Context, OperatorConfig};
use crate::error::Error;
use crate::stores::Feeds;
use futures::StreamExt;
use hvx_api::{OverlayDisk, VirtualNetwork, VmApplication};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

/// The key of an object in the backoff table.
fn failure_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

/// Retry after a failed pass: exponential backoff per object (1 s, 2 s, 4 s, ... up to
/// 5 min) with +-25 % jitter, so a thousand objects failing together (an API server
/// hiccup) do not come back in lockstep, and one broken object does not retry hot.
pub fn backoff(failures: u32, jitter_seed: u64) -> Duration {
    let base = Duration::from_secs(1)
        .saturating_mul(1u32 << failures.saturating_sub(1).min(9))
        .min(Duration::from_secs(300));
    // jitter in [-25 %, +25 %]
    let permille = (jitter_seed % 501) as u32; // 0..=500
    base.mul_f64(0.75 + f64::from(permille) / 1000.0)
}

fn jitter_seed(key: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(key.as_bytes());
    h.finish()
}

fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    let key = failure_key(obj.as_ref());
    let n = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let after = backoff(n, jitter_seed(&key));
    tracing::warn!(object = %key, kind = err.kind(), failures = n, retry_in = ?after, error = %err, "reconcile failed");
    Action::requeue(after)
}

/// Runs one reconcile, records it in the metrics, and clears the object's backoff
/// once a pass succeeds.
async fn timed<K: Resource<DynamicType = ()>>(
    ctx: Arc<Context>,
    controller: &'static str,
    obj: &K,
    f: impl std::future::Future<Output = Result<Action, Error>>,
) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let r = f.await;
    ctx.metrics.reconcile(
        controller,
        started.elapsed(),
        r.as_ref().err().map(Error::kind),
    );
    if r.is_ok() {
        let mut failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        if !failures.is_empty() {
            failures.remove(&failure_key(obj));
        }
    }
    r
}

fn log_result<T: std::fmt::Debug, E: std::fmt::Display>(r: Result<T, E>) {
    match r {
        Ok(obj) => tracing::debug!(?obj, "reconciled"),
        Err(e) => tracing::debug!(error = %e, "reconcile error"),
    }
}

/// The VirtualNetworks a launcher pod's VM is attached to.
fn networks_of_pod(pod: &Pod) -> Vec<ObjectRef<VirtualNetwork>> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    crate::hostplan::pod_launch_spec(pod)
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

/// The VmApplications of a namespace that use a VirtualNetwork or OverlayDisk: its
/// changes (a VNI allocated, an import finished) move them on without a timer.
fn apps_using(
    apps: &kube::runtime::reflector::Store<VmApplication>,
    ns: Option<&str>,
    uses: impl Fn(&VmApplication) -> bool,
) -> Vec<ObjectRef<VmApplication>> {
    apps.state()
        .iter()
        .filter(|a| a.metadata.namespace.as_deref() == ns && uses(a))
        .map(|a| ObjectRef::from_obj(a.as_ref()))
        .collect()
}

/// References to the named objects of an application's namespace (its networks or
/// disks, which wait for its deletion).
fn in_namespace_of<K: Resource<DynamicType = ()>>(
    app: &VmApplication,
    names: std::collections::BTreeSet<String>,
) -> Vec<ObjectRef<K>> {
    let ns = app.metadata.namespace.clone().unwrap_or_default();
    names
        .iter()
        .map(|n| ObjectRef::new(n).within(&ns))
        .collect()
}

/// VMs by phase and migrations in progress, from the caches (scrape time).
fn cache_gauges(
    apps: &[Arc<hvx_api::VmApplication>],
    migrations: &[Arc<hvx_api::VmMigration>],
) -> crate::metrics::CacheGauges {
    let mut g = crate::metrics::CacheGauges::default();
    for app in apps {
        let status = app.status.as_ref();
        for vm in &app.spec.vms {
            let phase = status
                .and_then(|s| s.vms.iter().find(|v| v.name == vm.name))
                .map_or_else(|| "Pending".to_string(), |v| format!("{:?}", v.phase));
            *g.vms_by_phase.entry(phase).or_default() += 1;
        }
    }
    let now = k8s_openapi::jiff::Timestamp::now();
    for m in migrations {
        if m.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(|p| p.is_final())
        {
            continue;
        }
        g.migrations_in_progress += 1;
        if let Some(created) = &m.metadata.creation_timestamp {
            let age = now.duration_since(created.0).as_secs_f64().max(0.0);
            g.oldest_migration_seconds = g.oldest_migration_seconds.max(age);
        }
    }
    g
}

/// `run`, recording into `metrics`.
pub async fn run_with_metrics(
    client: Client,
    config: OperatorConfig,
    instance: Option<String>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let seal = match config.seal_key.clone() {
        Some(k) => k,
        None => match hvx_api::seal::SealKey::ephemeral() {
            Ok(k) => {
                tracing::warn!(
                    "no seal key configured: launcher pods are sealed with a key of this process, which no node agent holds"
                );
                k
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot make a seal key; not starting");
                return;
            }
        },
    };
    let feeds = Feeds::new(&client, &config.namespace);
    let stores = feeds.stores(seal);
    {
        let (apps, migrations) = (stores.apps.clone(), stores.migrations.clone());
        metrics.set_cache_gauges(move || cache_gauges(&apps.state(), &migrations.state()));
    }
    let concurrency = config.reconcile_concurrency;
    let controller_config = || ControllerConfig::default().concurrency(concurrency);
    let ctx = Arc::new(Context::with_metrics(
        client.clone(),
        config,
        Reporter {
            controller: "hvx-operator".into(),
            instance,
        },
        metrics,
        stores.clone(),
    ));
    tracing::info!(config = ?ctx.config, "controllers starting");

    let apps_for_disks = stores.apps.clone();
    let apps_for_nets = stores.apps.clone();
    // Status writes of its own do not wake the application controller (it is their only
    // writer; see `own_changes_only`).
    let app_changes = crate::stores::own_changes_only(feeds.apps.subscribe(), stores.apps.clone());
    let apps = Controller::for_shared_stream(app_changes, stores.apps.clone())
        .with_config(controller_config())
        .owns_shared_stream(feeds.pods.subscribe())
        .watches_shared_stream(feeds.disks.subscribe(), move |d: Arc<OverlayDisk>| {
            let name = d.name_any();
            apps_using(&apps_for_disks, d.metadata.namespace.as_deref(), |a| {
                crate::disk::uses_disk(a, &name)
            })
        })
        .watches_shared_stream(feeds.networks.subscribe(), move |n: Arc<VirtualNetwork>| {
            let name = n.name_any();
            apps_using(&apps_for_nets, n.metadata.namespace.as_deref(), |a| {
                crate::network::uses_network(a, &name)
            })
        })
        .shutdown_on_signal()
        .run(
            |o, c| async move {
                timed(
                    c.clone(),
                    "vmapp",
                    o.as_ref(),
                    crate::vmapp::reconcile(o.clone(), c),
                )
                .await
            },
            error_policy,
            ctx.clone(),
        )
        .for_each(|r| async move { log_result(r) });
    let nets = Controller::for_shared_stream(feeds.networks.subscribe(), stores.networks.clone())
        .with_config(controller_config())
        // A VM pod bound, started or gone changes its networks' per-node state.
        .watches_shared_stream(feeds.pods.subscribe(), |p: Arc<Pod>| networks_of_pod(&p))
        // An application changed or gone: a network waiting for it to be deleted goes.
        .watches_shared_stream(feeds.apps.subscribe(), |a: Arc<VmApplication>| {
            in_namespace_of::<VirtualNetwork>(&a, crate::vmapp::network_names(&a))
        })
        .shutdown_on_signal()
        .run(
            |o, c| async move {
                timed(
                    c.clone(),
                    "network",
                    o.as_ref(),
                    crate::network::reconcile(o.clone(), c),
                )
                .await
            },
            error_policy,
            ctx.clone(),
        )
        .for_each(|r| async move { log_result(r) });
    // The tasks following imports wake their disk's reconcile, which writes what they
    // heard (one writer of the status).
    let disk_wakeups = ctx
        .disk_wakeups_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .map(tokio_stream::wrappers::UnboundedReceiverStream::new);
    // The upload endpoint records progress and wakes the disk the same way.
    let upload_wakeups = ctx
        .config
        .upload
        .as_ref()
        .and_then(|u| u.book.take_wakeups())
        .map(|rx| {
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
                .map(|(ns, name)| ObjectRef::<OverlayDisk>::new(&name).within(&ns))
        });
    let disks = Controller::for_shared_stream(feeds.disks.subscribe(), stores.disks.clone())
        .with_config(controller_config())
        .reconcile_on(futures::stream::iter(disk_wakeups).flatten())
        .reconcile_on(futures::stream::iter(upload_wakeups).flatten())
        // An application gone: a disk waiting for it to be deleted goes.
        .watches_shared_stream(feeds.apps.subscribe(), |a: Arc<VmApplication>| {
            in_namespace_of::<OverlayDisk>(&a, crate::disk::disk_names(&a))
        })
        .shutdown_on_signal()
        .run(
            |o, c| async move {
                timed(
                    c.clone(),
                    "disk",
                    o.as_ref(),
                    crate::disk::reconcile(o.clone(), c),
                )
                .await
            },
            error_policy,
            ctx.clone(),
        )
        .for_each(|r| async move { log_result(r) });
    // The progress tasks of live migrations wake their migration's reconcile, which
    // writes what they heard (one writer of the status).
    let wakeups = ctx
        .migration_wakeups_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .map(tokio_stream::wrappers::UnboundedReceiverStream::new);
    let migrations =
        Controller::for_shared_stream(feeds.migrations.subscribe(), stores.migrations.clone())
            .with_config(controller_config())
            .reconcile_on(futures::stream::iter(wakeups).flatten())
            .shutdown_on_signal()
            .run(
                |o, c| async move {
                    timed(
                        c.clone(),
                        "migration",
                        o.as_ref(),
                        crate::migration::reconcile(o.clone(), c),
                    )
                    .await
                },
                error_policy,
                ctx.clone(),
            )
            .for_each(|r| async move { log_result(r) });
    // Pods carrying hvx labels that hvx did not make: one warning each.
    let untrusted = crate::trust::warn_untrusted(ctx.clone(), feeds.pods.subscribe());
    // Cordoned nodes -> VmMigrations for their VMs (kubectl drain).
    let drains = Controller::for_shared_stream(feeds.nodes.subscribe(), stores.nodes.clone())
        .with_config(controller_config())
        .shutdown_on_signal()
        .run(
            |o, c| async move {
                timed(
                    c.clone(),
                    "drain",
                    o.as_ref(),
                    crate::drain::reconcile(o.clone(), c),
                )
                .await
            },
            error_policy,
            ctx.clone(),
        )
        .for_each(|r| async move { log_result(r) });

    // The watches run for as long as the controllers; the controllers start once every
    // cache has its first list.
    let watches = futures::stream::select_all([
        feeds.nodes.run().boxed(),
        feeds.pods.run().boxed(),
        feeds.migrations.run().boxed(),
        feeds.networks.run().boxed(),
        feeds.disks.run().boxed(),
        feeds.apps.run().boxed(),
        feeds.leases.run().boxed(),
    ])
    .for_each(|()| async {});
    let controllers = async {
        let ready = stores.wait_until_ready();
        tokio::pin!(ready);
        loop {
            match tokio::time::timeout(crate::stores::READY_LOG_AFTER, &mut ready).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "a watch ended before its first list");
                    return;
                }
                Err(_) => tracing::warn!("still waiting for the first list of every watched kind"),
            }
        }
        tracing::info!(stores = ?stores, "caches filled; reconciling");
        futures::join!(apps, nets, disks, migrations, drains, untrusted);
    };
    // The sweep has no end of its own: it stops with the controllers (shutdown signal).
    tokio::select! {
        () = controllers => {}
        () = watches => {}
        () = crate::sweep::run(ctx.clone()) => {}
        () = crate::replay::run(
            ctx.clone(),
            crate::context::Timings::secs(ctx.config.timings.owed_replay_seconds),
        ) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for seed in [0, 250, 500, 12_345, u64::MAX] {
            let first = backoff(1, seed);
            assert!(
                (Duration::from_millis(750)..=Duration::from_millis(1250)).contains(&first),
                "{first:?}"
            );
            let fourth = backoff(4, seed);
            assert!(
                (Duration::from_secs(6)..=Duration::from_secs(10)).contains(&fourth),
                "{fourth:?}"
            );
            assert!(backoff(40, seed) <= Duration::from_secs(375), "capped");
        }
        // Two objects failing together come back at different times.
        assert_ne!(backoff(3, 1), backoff(3, 400));
    }
}
