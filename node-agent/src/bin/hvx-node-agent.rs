//! hvx-node-agent: the per-node agent (DaemonSet). Serves the operator's gRPC contract
//! over mutual TLS, re-applies this node's networks at start, probes the accelerator
//! and labels the node when ready. See `hvx_node_agent::agent`.

use anyhow::Context;
use clap::Parser;
use hvx_node_agent::agent::{
    Agent, AgentConfig, http_policy, label, metrics, network, server::AgentService,
};
use hvx_proto::v1::node_agent_server::NodeAgentServer;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::transport::Server;

#[derive(Parser, Debug)]
#[command(
    name = "hvx-node-agent",
    version,
    about = "hvx node agent: disks, overlay network and VMs of one node"
)]
struct Cli {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// This node's address: the VXLAN tunnel endpoint and where the operator dials.
    #[arg(long, env = "NODE_IP")]
    node_ip: Ipv4Addr,
    /// gRPC listen address.
    #[arg(long, default_value = "0.0.0.0:9443")]
    listen: SocketAddr,
    /// Metrics and health listen address.
    #[arg(long, default_value = "0.0.0.0:9444")]
    metrics_listen: SocketAddr,
    /// Persistent root (disk store, agent state).
    #[arg(long, default_value = hvx_api::node::DEFAULT_STORE_ROOT)]
    store_root: PathBuf,
    /// Runtime root (VM run dirs, overlay state).
    #[arg(long, default_value = hvx_api::node::DEFAULT_RUN_ROOT)]
    run_root: PathBuf,
    /// Directory with ca.crt, tls.crt, tls.key: serve mutual TLS to the operator's
    /// client identity only (a certificate chained to ca.crt naming hvx-operator, for
    /// client authentication only). The files are re-read when they change. With
    /// --issuer-url the agent writes them itself. Without it the agent serves plaintext.
    #[arg(long, env = "HVX_AGENT_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// The operator's certificate endpoint (`https://hvx-identity.<namespace>.svc:9445`):
    /// the agent makes its key in --tls-dir and gets this node's certificate there, at
    /// start and at half life. Needs --tls-dir.
    #[arg(long, env = "HVX_ISSUER_URL", requires = "tls_dir")]
    issuer_url: Option<String>,
    /// The projected ServiceAccount token (audience hvx-operator) that proves this
    /// agent's node to the operator.
    #[arg(
        long,
        env = "HVX_TOKEN_FILE",
        default_value = "/var/run/secrets/hvx/token"
    )]
    token_file: PathBuf,
    /// The operator's namespace: where it publishes the CA bundle (ConfigMap hvx-agent-ca).
    #[arg(long, env = "POD_NAMESPACE", default_value = "hvx-system")]
    namespace: String,
    /// MTU of the underlay between nodes (default: the MTU of the interface that
    /// holds --node-ip).
    #[arg(long)]
    underlay_mtu: Option<u32>,
    /// The cluster's pod CIDR(s), comma-separated: guests' egress NAT never reaches
    /// them (a VM is a tenant, not a pod). Default: kubeadm/flannel's 10.244.0.0/16.
    #[arg(long, value_delimiter = ',', default_value = "10.244.0.0/16")]
    pod_cidr: Vec<hvx_overlay::Ipv4Net>,
    /// The cluster's service CIDR(s), comma-separated: denied to guests' egress
    /// like the pod CIDR. Default: kubeadm's 10.96.0.0/12.
    #[arg(long, value_delimiter = ',', default_value = "10.96.0.0/12")]
    service_cidr: Vec<hvx_overlay::Ipv4Net>,
    /// Exceptions, comma-separated: destinations inside the denied ranges (pod,
    /// service, link-local 169.254.0.0/16) that guests may reach. Default: none.
    #[arg(long, value_delimiter = ',')]
    egress_allowed_cidr: Vec<hvx_overlay::Ipv4Net>,
    /// File holding the key launcher pod metadata is sealed with (the chart's
    /// `hvx-seal-key` Secret). Without it every launcher's spec is refused.
    #[arg(long, env = "HVX_SEAL_KEY_FILE")]
    seal_key_file: Option<PathBuf>,
    /// The kubelet's pod log root: its `<namespace>_<pod>_<uid>` directories tell
    /// which pod a launcher asking for its taps is (by the UID in its cgroup).
    #[arg(long, default_value = "/var/log/pods")]
    pod_logs_dir: PathBuf,
    /// Per-VM metrics (labelled with VM ids) listen address: loopback by default, so
    /// only the node itself reads them; the metrics port has node totals only.
    #[arg(long, default_value = "127.0.0.1:9445")]
    vm_metrics_listen: SocketAddr,
    /// Ranges `http` disk sources may reach although denied (pod, service, node,
    /// API server, loopback, link-local), comma-separated
    /// (`agent.httpSources.allowCIDRs`). Default: none.
    #[arg(long, value_delimiter = ',')]
    http_allow_cidr: Vec<ipnet::IpNet>,
    /// More ranges `http` disk sources may not reach, comma-separated
    /// (`agent.httpSources.denyCIDRs`).
    #[arg(long, value_delimiter = ',')]
    http_deny_cidr: Vec<ipnet::IpNet>,
    /// Origins (`http://host:port`) fetched without the egress checks (an in-cluster
    /// image server the operator of the cluster trusts). Uploads no longer need one:
    /// their bytes arrive through PutUpload.
    #[arg(long, value_delimiter = ',')]
    http_trusted_origin: Vec<String>,
    /// Bytes all disk uploads held on this node may take together (each counted at
    /// its declared total); 0: only the store's free space limits them.
    #[arg(long, env = "HVX_UPLOAD_CAPACITY_BYTES", default_value_t = 0)]
    upload_capacity_bytes: u64,
    /// The kubelet's root dir on this node (its `--root-dir`), mounted at the same
    /// path: the agent serves the `vm.hvx.dev` CSI driver that gives launcher pods
    /// their VM's directories, and the `devices.hvx.dev/kvm` device plugin, both
    /// registered in `<dir>/plugins_registry`. Unset: neither
    /// (launcher pods cannot start here).
    #[arg(long, env = "HVX_KUBELET_ROOT_DIR")]
    kubelet_root_dir: Option<PathBuf>,
    /// Where the kubelet root's `plugins_registry/`, `plugins/vm.hvx.dev/` and
    /// `plugins/devices.hvx.dev/` are
    /// mounted in this container. Default: --kubelet-root-dir.
    #[arg(long, requires = "kubelet_root_dir")]
    kubelet_mount: Option<PathBuf>,
    /// Prerequisite check settings (JSON: `defaults` and per-node `nodes` overrides
    /// of minFreeBytes, qemuSystem, qemuImg, nft, tunDevice, kvmDevice; the chart's
    /// `agent.prerequisites`), re-read at every check. Unset: built-in defaults.
    #[arg(long, env = "HVX_PREREQUISITES_FILE")]
    prerequisites_file: Option<PathBuf>,
    /// Seconds between prerequisite checks (also run at start).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..))]
    prerequisites_interval_seconds: u64,
    /// Label this node `hvx.dev/agent=ready` (needs API access).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    label_node: bool,
}

/// MTU of the interface holding `ip` (`ip -o -4 addr`), else 1500.
fn interface_mtu(ip: Ipv4Addr) -> u32 {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["-o", "-4", "addr", "show"]);
    let out = hvx_child::output(cmd)
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let needle = format!("inet {ip}/");
    out.lines()
        .find(|l| l.contains(&needle))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|dev| std::fs::read_to_string(format!("/sys/class/net/{dev}/mtu")).ok())
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(1500)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    if let (Ok(mut t), Ok(mut i)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        tokio::select! {
            _ = t.recv() => {}
            _ = i.recv() => {}
        }
    } else {
        std::future::pending::<()>().await;
    }
    tracing::info!("shutting down (VMs keep running)");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn,h2=warn,tower=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    hvx_identity::install_crypto_provider();
    let v4 = |n: &hvx_overlay::Ipv4Net| {
        ipnet::Ipv4Net::new(n.addr, n.prefix)
            .map(ipnet::IpNet::V4)
            .ok()
    };
    let http_policy = http_policy::build(&http_policy::PolicyInputs {
        pod_cidrs: cli.pod_cidr.iter().filter_map(v4).collect(),
        service_cidrs: cli.service_cidr.iter().filter_map(v4).collect(),
        extra_denied: cli.http_deny_cidr.clone(),
        allowed: cli.http_allow_cidr.clone(),
        node_addrs: std::iter::once(std::net::IpAddr::V4(cli.node_ip))
            .chain(http_policy::node_addresses())
            .collect(),
        apiserver_addrs: if cli.label_node {
            http_policy::apiserver_addresses().await
        } else {
            Vec::new()
        },
        trusted_origins: cli.http_trusted_origin.clone(),
    });
    let config = AgentConfig {
        http_policy,
        underlay_mtu: cli
            .underlay_mtu
            .unwrap_or_else(|| interface_mtu(cli.node_ip)),
        node_name: cli.node_name.clone(),
        node_ip: cli.node_ip,
        store_root: cli.store_root.clone(),
        run_root: cli.run_root.clone(),
        egress_denied: cli
            .pod_cidr
            .iter()
            .chain(&cli.service_cidr)
            .copied()
            .collect(),
        egress_allowed: cli.egress_allowed_cidr.clone(),
        upload_capacity_bytes: (cli.upload_capacity_bytes > 0).then_some(cli.upload_capacity_bytes),
    };
    tracing::info!(?config, "starting");
    let agent = Arc::new(Agent::open(config).context("opening the node's disk store and switch")?);
    // Before anything is started: probes and conversions a killed predecessor left
    // (by recorded pid and start time) go, and this run's children are recorded.
    let children =
        hvx_child::Tracker::new(agent.paths.agent_state().join("children"), "hvx-node-agent")
            .context("opening the agent's child records")?;
    match children.reap_stale() {
        Ok(reaped) => {
            let killed = reaped.iter().filter(|r| r.killed).count();
            tracing::info!(
                killed,
                stale_records = reaped.len(),
                "leftover processes of earlier agents reaped"
            );
        }
        Err(e) => tracing::warn!(error = %e, "reaping leftover processes of earlier agents"),
    }
    children.install();

    match network::restore(&agent).await {
        Ok(n) => tracing::info!(networks = n, "persisted networks re-applied"),
        Err(e) => tracing::warn!(error = %e, "re-applying persisted networks"),
    }
    // Replica daemons died with the previous agent (and were reaped above): serve
    // the recorded replicas again, on their ports, before the operator asks.
    let replicas = hvx_node_agent::agent::replica::restore(&agent).await;
    tracing::info!(replicas, "recorded disk replicas served again");

    // Accelerator probe (a probe guest boots) and post-copy probe, then the labels.
    // The devices.hvx.dev/kvm device plugin starts once the probe says what a unit
    // brings (/dev/kvm or nothing).
    let device_plugins = cli.kubelet_root_dir.clone().map(|root| {
        let mount = cli.kubelet_mount.clone().unwrap_or_else(|| root.clone());
        (root, mount)
    });
    {
        let agent = agent.clone();
        let (node, label_node) = (cli.node_name.clone(), cli.label_node);
        let device_plugins = device_plugins.clone();
        tokio::spawn(async move {
            let opts = hvx_vmm::accel::ProbeOptions::default();
            let report = hvx_vmm::probe_accelerator(&opts).await;
            tracing::info!(accel = report.accel.as_str(), reason = %report.reason, "accelerator probed");
            if let Some((root, mount)) = device_plugins {
                use hvx_node_agent::agent::deviceplugin;
                let node = deviceplugin::NodeDevices {
                    kvm: report.accel == hvx_vmm::Accel::Kvm,
                    userfaultfd: Path::new(deviceplugin::USERFAULTFD_DEVICE).exists(),
                };
                tokio::spawn(deviceplugin::run(root, mount, node));
            }
            let post_copy = match hvx_vmm::postcopy::probe(&opts.qemu).await {
                Ok(()) => true,
                Err(why) => {
                    tracing::info!(%why, "post-copy migration unavailable on this node");
                    false
                }
            };
            let accel = report.accel.as_str().to_string();
            *agent.accel.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
            if label_node {
                label::label_node(&node, &accel, post_copy).await;
            }
        });
    }

    // Node prerequisites: condition HvxReady, annotation, Warning event on failure.
    tokio::spawn(hvx_node_agent::agent::prereq::run_forever(
        agent.clone(),
        cli.prerequisites_file.clone(),
        std::time::Duration::from_secs(cli.prerequisites_interval_seconds),
        cli.label_node,
    ));

    // Orphaned bases (released while still in use) go once unused for 10 minutes.
    {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(300));
            loop {
                tick.tick().await;
                match hvx_node_agent::agent::disks::gc_orphans(
                    &agent,
                    std::time::Duration::from_secs(600),
                )
                .await
                {
                    Ok(r) if !r.is_empty() => {
                        tracing::info!(removed = ?r, "orphaned bases removed")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "base garbage collection"),
                }
            }
        });
    }

    // dnsmasq logs live in tmpfs: rotate the ones that outgrew their cap.
    {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tick.tick().await;
                let a = agent.clone();
                let _ = tokio::task::spawn_blocking(move || a.switch.cap_logs()).await;
            }
        });
    }

    let metrics_listener = tokio::net::TcpListener::bind(cli.metrics_listen)
        .await
        .with_context(|| format!("binding {}", cli.metrics_listen))?;
    tokio::spawn(metrics::serve(
        metrics_listener,
        agent.clone(),
        metrics::Detail::NodeTotals,
    ));
    let vm_metrics_listener = tokio::net::TcpListener::bind(cli.vm_metrics_listen)
        .await
        .with_context(|| format!("binding {}", cli.vm_metrics_listen))?;
    if !cli.vm_metrics_listen.ip().is_loopback() {
        tracing::warn!(listen = %cli.vm_metrics_listen, "per-VM metrics (VM ids) served beyond this node without authentication");
    }
    tokio::spawn(metrics::serve(
        vm_metrics_listener,
        agent.clone(),
        metrics::Detail::PerVm,
    ));

    // Launchers have their launch spec's seal checked here before they boot, and
    // get their NICs' tap fds here (`tapfd`).
    let seal_key = match &cli.seal_key_file {
        Some(f) => Some(hvx_api::seal::SealKey::from_file(f).context("--seal-key-file")?),
        None => {
            tracing::warn!("--seal-key-file not set: every launcher's launch spec is refused");
            None
        }
    };
    if let Some(root) = &cli.kubelet_root_dir {
        let driver = hvx_node_agent::agent::csi::CsiDriver {
            agent: agent.clone(),
            client: kube::Client::try_default()
                .await
                .context("Kubernetes client (for the CSI driver's pod checks)")?,
            seal_key: Arc::new(seal_key.clone()),
            kubelet_root: root.clone(),
            kubelet_mount: cli.kubelet_mount.clone().unwrap_or_else(|| root.clone()),
        };
        tokio::spawn(async move {
            if let Err(e) = hvx_node_agent::agent::csi::serve(driver).await {
                tracing::error!(error = %e, "the vm.hvx.dev CSI driver stopped");
            }
        });
    } else {
        tracing::warn!(
            "--kubelet-root-dir not set: no vm.hvx.dev CSI driver, launcher pods cannot start on this node"
        );
    }
    {
        let path = agent.paths.seal_socket();
        let pod_logs_dir = cli.pod_logs_dir.clone();
        tokio::spawn(async move {
            let policy = hvx_node_agent::tapfd::TapPolicy {
                pod_logs: pod_logs_dir,
                ..Default::default()
            };
            if let Err(e) = hvx_node_agent::sealcheck::serve_with(&path, seal_key, policy).await {
                tracing::error!(error = %e, path = %path.display(), "launch spec checks stopped");
            }
        });
    }

    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    let service = NodeAgentServer::new(AgentService { agent });
    tracing::info!(listen = %cli.listen, "serving");
    // Liveness: the operator counts this node lost only when this Lease and the Node
    // both stop (then cleanup owed to it is recorded rather than waited for).
    let renewal = cli.label_node.then(|| {
        tokio::spawn(hvx_node_agent::agent::lease::renew_forever(
            cli.node_name.clone(),
            cli.namespace.clone(),
        ))
    });
    match &cli.tls_dir {
        Some(dir) => {
            if let Some(url) = &cli.issuer_url {
                let client = kube::Client::try_default()
                    .await
                    .context("Kubernetes client (for the CA bundle)")?;
                let enroller = hvx_identity::enroll::Enroller {
                    dir: dir.clone(),
                    node: cli.node_name.clone(),
                    url: url.clone(),
                    server_name: None,
                    token_file: cli.token_file.clone(),
                    ca: hvx_identity::enroll::CaSource::ConfigMap {
                        client,
                        namespace: cli.namespace.clone(),
                    },
                };
                // Until the first certificate arrives handshakes fail (and are logged);
                // an agent restarted with a valid certificate on disk serves at once.
                tokio::spawn(enroller.run());
            }
            let tls =
                hvx_identity::verify::agent_server_config(dir).context("TLS configuration")?;
            tracing::info!(dir = %dir.display(), "serving mutual TLS to the operator's identity only");
            Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    hvx_identity::verify::incoming(listener, tls),
                    shutdown_signal(),
                )
                .await
                .context("gRPC server")?;
            if cli.issuer_url.is_some()
                && forget_identity_if_node_is_empty(&cli.store_root, &cli.node_name, dir)
                && let Some(renewal) = &renewal
            {
                // Stopped first, so it cannot re-create the Lease just deleted.
                renewal.abort();
                hvx_node_agent::agent::lease::delete(&cli.node_name, &cli.namespace).await;
            }
            if let Some(root) = cli.kubelet_mount.as_ref().or(cli.kubelet_root_dir.as_ref()) {
                hvx_node_agent::agent::csi::remove_sockets(root);
            }
            if let Some((_, mount)) = &device_plugins {
                hvx_node_agent::agent::deviceplugin::remove_sockets(mount);
            }
        }
        None => {
            tracing::warn!("--tls-dir not set: serving gRPC WITHOUT TLS (development only)");
            Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    shutdown_signal(),
                )
                .await
                .context("gRPC server")?;
            if let Some(root) = cli.kubelet_mount.as_ref().or(cli.kubelet_root_dir.as_ref()) {
                hvx_node_agent::agent::csi::remove_sockets(root);
            }
            if let Some((_, mount)) = &device_plugins {
                hvx_node_agent::agent::deviceplugin::remove_sockets(mount);
            }
        }
    }
    Ok(())
}

/// On shutdown, an agent whose node holds nothing of hvx any more (no disks, overlays,
/// networks or VM state: `helm uninstall` deleted them all first) removes its key and
/// certificate, so an uninstall leaves no private key on the node. With state left
/// (an agent restart, an upgrade) they stay and the next start serves at once; a
/// removed identity costs one enrolment at the next start. Returns whether the node
/// held nothing (the caller then deletes the node's liveness Lease too).
fn forget_identity_if_node_is_empty(store_root: &Path, node: &str, tls_dir: &Path) -> bool {
    let paths = hvx_api::node::NodePaths::new(store_root, Path::new("/run/hvx"), node);
    let node_dir = paths.node_dir();
    fn has_files_outside(dir: &Path, skip: &Path) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        entries.flatten().any(|e| {
            let p = e.path();
            if p.starts_with(skip) {
                return false;
            }
            match e.file_type() {
                Ok(t) if t.is_dir() => has_files_outside(&p, skip),
                Ok(_) => true,
                Err(_) => true,
            }
        })
    }
    if has_files_outside(node_dir, tls_dir) {
        return false;
    }
    match std::fs::remove_dir_all(tls_dir) {
        Ok(()) => {
            tracing::info!(dir = %tls_dir.display(), "node holds no hvx state: removed this agent's key and certificate")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %tls_dir.display(), error = %e, "could not remove this agent's key and certificate")
        }
    }
    true
}
