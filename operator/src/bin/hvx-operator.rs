//! The hvx operator binary.

use anyhow::Context as _;
use clap::Parser;
use hvx_operator::OperatorConfig;
use hvx_operator::context::defaults;
use kube::Client;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "hvx operator: runs VMware applications on Kubernetes"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Launcher image for VM pods.
    #[arg(long, env = "HVX_LAUNCHER_IMAGE", default_value = defaults::LAUNCHER_IMAGE)]
    launcher_image: String,
    /// Pull policy for the launcher image.
    #[arg(long, env = "HVX_IMAGE_PULL_POLICY", default_value = defaults::IMAGE_PULL_POLICY)]
    image_pull_policy: String,
    /// CPU request per vCPU, millicores (lower overcommits).
    #[arg(long, env = "HVX_CPU_MILLIS_PER_VCPU", default_value_t = defaults::CPU_MILLIS_PER_VCPU)]
    cpu_millis_per_vcpu: u32,
    /// Schedule VMs only on nodes labelled `hvx.dev/agent=ready`.
    #[arg(long, env = "HVX_REQUIRE_AGENT_LABEL", default_value_t = true, action = clap::ArgAction::Set)]
    require_agent_label: bool,
    /// Node agents' gRPC port (they listen on the host network).
    #[arg(long, env = "HVX_AGENT_PORT", default_value_t = hvx_api::node::AGENT_PORT)]
    agent_port: u16,
    /// Deadline of one call to a node agent (and of a stream's first answer), seconds.
    #[arg(long, env = "HVX_AGENT_TIMEOUT_SECONDS", default_value_t = defaults::AGENT_TIMEOUT_SECONDS)]
    agent_timeout_seconds: u64,
    /// Directory of the CA (the hvx-ca Secret: tls.crt and tls.key, the CA's certificate
    /// and key; ca.crt, the bundle to trust). The operator mints its client-only
    /// certificate from it, signs agents' certificates on --identity-listen and publishes
    /// ca.crt for agents (ConfigMap hvx-agent-ca). Without it, agents are called in
    /// plaintext (development).
    #[arg(long, env = "HVX_CA_DIR")]
    ca_dir: Option<std::path::PathBuf>,
    /// Where agents ask for their certificates (the `hvx-identity` Service targets it).
    #[arg(long, env = "HVX_IDENTITY_LISTEN", default_value = "0.0.0.0:9445")]
    identity_listen: std::net::SocketAddr,
    /// Serve disk uploads (`kubectl hvx import --upload`): the bytes go to the node
    /// agents' stores as they arrive, nothing is kept in this pod.
    #[arg(long, env = "HVX_UPLOADS", default_value_t = false)]
    uploads: bool,
    /// Where to serve Prometheus `/metrics` and `/healthz` (empty: nowhere).
    #[arg(long, env = "HVX_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    metrics_listen: String,
    /// Live migrations leaving one node at once.
    #[arg(long, env = "HVX_MAX_MIGRATIONS_PER_NODE", default_value_t = defaults::MIGRATIONS_PER_NODE)]
    max_migrations_per_node: usize,
    /// Live migrations in the whole cluster at once.
    #[arg(long, env = "HVX_MAX_MIGRATIONS", default_value_t = defaults::MIGRATIONS_TOTAL)]
    max_migrations: usize,
    /// Objects of one kind reconciled at once.
    #[arg(long, env = "HVX_RECONCILE_CONCURRENCY", default_value_t = defaults::RECONCILE_CONCURRENCY)]
    reconcile_concurrency: u16,
    /// Upload endpoint listen address (the `hvx-upload` Service targets it).
    #[arg(long, env = "HVX_UPLOAD_LISTEN", default_value = "0.0.0.0:8081")]
    upload_listen: std::net::SocketAddr,
    /// Largest disk accepted by upload, bytes.
    #[arg(long, env = "HVX_UPLOAD_MAX_BYTES", default_value_t = 2 << 40)]
    upload_max_bytes: u64,
    /// File holding the key launcher pod metadata is sealed with (the chart's
    /// `hvx-seal-key` Secret; the node agents read the same key).
    #[arg(long, env = "HVX_SEAL_KEY_FILE")]
    seal_key_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    timings: hvx_operator::context::Timings,
    #[command(flatten)]
    liveness: hvx_operator::liveness::LivenessSettings,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the controllers (the default).
    Run,
    /// Delete every hvx object and wait for the finalizers (Helm pre-delete hook).
    Uninstall {
        /// Give up after this long.
        #[arg(long, default_value_t = 540)]
        timeout_seconds: u64,
    },
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
    hvx_identity::install_crypto_provider();
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let namespace = std::env::var("POD_NAMESPACE")
        .unwrap_or_else(|_| hvx_operator::context::defaults::NAMESPACE.into());
    if let Some(Command::Uninstall { timeout_seconds }) = args.command {
        let left = hvx_operator::uninstall::uninstall(
            client,
            &namespace,
            std::time::Duration::from_secs(timeout_seconds),
        )
        .await
        .context("deleting hvx objects")?;
        anyhow::ensure!(
            left.is_empty(),
            "still present after {timeout_seconds}s: {}",
            left.join(", ")
        );
        tracing::info!("every hvx object deleted");
        return Ok(());
    }
    let agent_tls = match &args.ca_dir {
        Some(dir) => {
            let tls = std::sync::Arc::new(
                hvx_identity::issuer::OperatorTls::load_default(dir.clone(), &namespace)
                    .with_context(|| format!("loading the CA from {}", dir.display()))?,
            );
            tokio::spawn(tls.clone().maintain(Some(client.clone())));
            let listener = tokio::net::TcpListener::bind(args.identity_listen)
                .await
                .with_context(|| format!("binding --identity-listen {}", args.identity_listen))?;
            tracing::info!(listen = %args.identity_listen, "serving agent certificates");
            // Every replica, leader or not: agents must get certificates before anything
            // else works.
            let (issuer_tls, reviewer) = (tls.clone(), std::sync::Arc::new(client.clone()));
            tokio::spawn(async move {
                if let Err(e) = hvx_identity::issuer::serve(listener, issuer_tls, reviewer).await {
                    tracing::error!(error = %e, "agent certificate endpoint stopped");
                }
            });
            Some(tls.credentials.clone())
        }
        None => None,
    };
    let mut config = OperatorConfig {
        launcher_image: args.launcher_image,
        image_pull_policy: args.image_pull_policy,
        cpu_millis_per_vcpu: args.cpu_millis_per_vcpu,
        require_agent_label: args.require_agent_label,
        agents: hvx_operator::agents::AgentSettings {
            port: args.agent_port,
            tls: agent_tls,
            timeout: std::time::Duration::from_secs(args.agent_timeout_seconds.max(1)),
        },
        upload: None,
        migrations: hvx_operator::context::MigrationLimits {
            per_node: args.max_migrations_per_node.max(1),
            total: args.max_migrations.max(1),
        },
        reconcile_concurrency: args.reconcile_concurrency.max(1),
        timings: args.timings.clone(),
        seal_key: Some(
            hvx_api::seal::SealKey::from_file(args.seal_key_file.as_deref().context(
                "--seal-key-file (HVX_SEAL_KEY_FILE) is required: the key launcher pods are sealed with",
            )?)
            .context("--seal-key-file")?,
        ),
        namespace: namespace.clone(),
        liveness: args.liveness.clone(),
    };
    let metrics = std::sync::Arc::new(hvx_operator::metrics::Metrics::default());
    if args.uploads {
        let settings = hvx_operator::upload::UploadSettings {
            max_bytes: args.upload_max_bytes,
            book: hvx_operator::upload::UploadBook::default(),
        };
        let server = hvx_operator::upload::Server::new(
            settings.clone(),
            hvx_operator::upload::KubeDisks(client.clone()),
            hvx_operator::upload::KubeAccess::new(client.clone()),
            hvx_operator::upload::AgentCopies::new(
                client.clone(),
                config.agents.clone(),
                metrics.clone(),
            ),
        );
        let listener = tokio::net::TcpListener::bind(args.upload_listen)
            .await
            .with_context(|| format!("binding the upload endpoint {}", args.upload_listen))?;
        tracing::info!(listen = %args.upload_listen, "serving disk uploads (kept on the node agents)");
        // Serves on every replica, leader or not: it is a data path.
        tokio::spawn(hvx_operator::upload::serve(
            listener,
            std::sync::Arc::new(server),
        ));
        config.upload = Some(settings);
    }
    if config.agents.tls.is_none() {
        tracing::warn!("--ca-dir not set: node agents are called without TLS");
    }
    if !args.metrics_listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&args.metrics_listen)
            .await
            .with_context(|| format!("binding --metrics-listen {}", args.metrics_listen))?;
        tracing::info!(listen = %args.metrics_listen, "serving /metrics and /healthz");
        tokio::spawn(hvx_operator::metrics::serve(listener, metrics.clone()));
    }
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| "hvx-operator-local".into());
    let election = hvx_operator::leader::Election {
        namespace,
        name: "hvx-operator".into(),
        identity: identity.clone(),
        duration: std::time::Duration::from_secs(15),
    };
    let lost = hvx_operator::leader::lead(client.clone(), election).await;
    tokio::select! {
        () = hvx_operator::run::run_with_metrics(client, config, Some(identity), metrics) => {}
        () = lost => anyhow::bail!("lost leadership; exiting so a fresh replica takes over"),
    }
    tracing::info!("hvx operator stopped");
    Ok(())
}
