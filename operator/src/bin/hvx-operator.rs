//! The hvx operator binary.

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use hvx_api::{OverlayDisk, VirtualNetwork, VmApplication};
use hvx_operator::{Context, Error, OperatorConfig};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::watcher;
use kube::{Api, Client};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "hvx operator: runs VMware applications on Kubernetes"
)]
struct Args {
    /// Launcher image for VM pods.
    #[arg(long, env = "HVX_LAUNCHER_IMAGE", default_value = "hvx/launcher:dev")]
    launcher_image: String,
    /// Pull policy for the launcher image.
    #[arg(long, env = "HVX_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    image_pull_policy: String,
    /// CPU request per vCPU, millicores (lower overcommits).
    #[arg(long, env = "HVX_CPU_MILLIS_PER_VCPU", default_value_t = 1000)]
    cpu_millis_per_vcpu: u32,
    /// Schedule VMs only on nodes labelled `hvx.dev/agent=ready`.
    #[arg(long, env = "HVX_REQUIRE_AGENT_LABEL", default_value_t = true, action = clap::ArgAction::Set)]
    require_agent_label: bool,
}

fn error_policy<K>(_obj: Arc<K>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(kind = err.kind(), error = %err, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let ctx = Arc::new(Context {
        client: client.clone(),
        config: OperatorConfig {
            launcher_image: args.launcher_image,
            image_pull_policy: args.image_pull_policy,
            cpu_millis_per_vcpu: args.cpu_millis_per_vcpu,
            require_agent_label: args.require_agent_label,
        },
        reporter: Reporter {
            controller: "hvx-operator".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    });
    tracing::info!(config = ?ctx.config, "hvx operator starting");

    let apps = Controller::new(
        Api::<VmApplication>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels("hvx.dev/role=launcher"),
    )
    .shutdown_on_signal()
    .run(hvx_operator::vmapp::reconcile, error_policy, ctx.clone())
    .for_each(|r| async move { log_result(r) });
    let nets = Controller::new(
        Api::<VirtualNetwork>::all(client.clone()),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(hvx_operator::network::reconcile, error_policy, ctx.clone())
    .for_each(|r| async move { log_result(r) });
    let disks = Controller::new(
        Api::<OverlayDisk>::all(client.clone()),
        watcher::Config::default(),
    )
    .shutdown_on_signal()
    .run(hvx_operator::disk::reconcile, error_policy, ctx.clone())
    .for_each(|r| async move { log_result(r) });
    futures::join!(apps, nets, disks);
    tracing::info!("hvx operator stopped");
    Ok(())
}

fn log_result<T: std::fmt::Debug, E: std::fmt::Display>(r: Result<T, E>) {
    match r {
        Ok(obj) => tracing::debug!(?obj, "reconciled"),
        Err(e) => tracing::debug!(error = %e, "reconcile error"),
    }
}
