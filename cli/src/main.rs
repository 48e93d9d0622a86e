//! kubectl-hvx: `kubectl hvx import|console|migrate|snapshot|status|doctor`.
#![forbid(unsafe_code)]

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hvx_import::LoadOptions;
use kubectl_hvx::manifests::{self, DiskSourceMode, MapOptions};
use kubectl_hvx::upload::{self, HttpEndpoint, Progress, ProxyEndpoint, Tuning};
use kubectl_hvx::{cluster, console, doctor, objects, plan, render, status};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-hvx",
    version,
    about = "Run VMware applications on Kubernetes with hvx"
)]
struct Cli {
    /// Namespace (default: the kubeconfig's; omitted from printed manifests).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Turn an OVA, OVF or VMX into VmApplication, VirtualNetwork and OverlayDisk manifests.
    Import(ImportArgs),
    /// Attach to a VM's serial console (Ctrl-] detaches).
    Console {
        /// VM name.
        vm: String,
        /// Application, when several have a VM of that name.
        #[arg(long)]
        app: Option<String>,
    },
    /// Live-migrate a VM to another node.
    Migrate {
        /// VM name.
        vm: String,
        /// Application (found from the VM name when omitted).
        #[arg(long)]
        app: Option<String>,
        /// Target node (default: the operator picks).
        #[arg(long = "to")]
        target_node: Option<String>,
        /// Longest acceptable pause at switchover.
        #[arg(long, default_value_t = 300)]
        max_downtime_ms: u32,
        /// Allow post-copy for a guest that dirties memory faster than pre-copy sends
        /// it (bounded time; the VM needs both nodes until the last page has moved).
        #[arg(long)]
        post_copy: bool,
        /// Print the VmMigration instead of creating it (needs --app).
        #[arg(long)]
        print: bool,
    },
    /// Every node's prerequisite checks (its hvx agent's report): exits 1 when a
    /// node fails a required check.
    Doctor {
        /// Show only the checks that did not pass.
        #[arg(long)]
        failed_only: bool,
    },
    /// Applications, VMs, nodes and migrations in progress, on one screen.
    Status {
        /// Every namespace (default: the current or -n namespace).
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Request a snapshot of every disk of an application.
    Snapshot {
        /// VmApplication name.
        app: String,
        /// Snapshot name (default: snap-<date>-<time>).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
struct ImportArgs {
    /// The export: file.ova, file.ovf (disks beside it) or file.vmx (disks beside it).
    file: PathBuf,
    /// Write one YAML file per object into this directory instead of stdout.
    #[arg(short = 'o', long = "output-dir")]
    output_dir: Option<PathBuf>,
    /// Application name (default: from the export).
    #[arg(long)]
    name: Option<String>,
    /// Subnet of a VMware network, as NETWORK=CIDR (repeatable).
    #[arg(long = "subnet", value_name = "NETWORK=CIDR")]
    subnets: Vec<String>,
    /// The export is served at this URL: disks are fetched by the cluster from there
    /// (the OVA itself, or the directory holding the OVF/VMX disks).
    #[arg(long, conflicts_with = "upload")]
    source_url: Option<String>,
    /// Create the objects in the cluster and upload the disks into them.
    #[arg(long)]
    upload: bool,
    /// Upload endpoint base URL, e.g. `http://127.0.0.1:8081/v1alpha1` with
    /// `kubectl -n hvx-system port-forward svc/hvx-upload 8081`.
    #[arg(long, env = "HVX_UPLOAD_URL")]
    upload_url: Option<String>,
    /// Namespace hvx is installed in (its upload Service is reached through the API
    /// server when --upload-url is not given).
    #[arg(long, env = "HVX_NAMESPACE", default_value = "hvx-system")]
    hvx_namespace: String,
    /// Your Kubernetes bearer token for the upload endpoint (it checks it with a
    /// TokenReview and your rights on the disk with a SubjectAccessReview). Default:
    /// the kubeconfig user's token, tokenFile or exec plugin.
    #[arg(long, env = "HVX_UPLOAD_TOKEN", hide_env_values = true)]
    upload_token: Option<String>,
    /// Bytes per upload request (4 KiB to 64 MiB). Smaller chunks mean more requests;
    /// each is acknowledged once two nodes hold it.
    #[arg(long, env = "HVX_UPLOAD_CHUNK_BYTES", default_value_t = 8 << 20,
          value_parser = clap::value_parser!(u64).range(4096..=(64 << 20)))]
    upload_chunk_bytes: u64,
    /// Print the plan (objects, sizes, warnings) and do nothing.
    #[arg(long)]
    dry_run: bool,
    /// Skip the OVA manifest (.mf) checksum verification.
    #[arg(long)]
    no_verify: bool,
    /// OVF deployment option (DeploymentOptionSection configuration) to size the VMs
    /// for (default: the export's default).
    #[arg(long, value_name = "NAME")]
    deployment_option: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Doctor { failed_only } => {
            let client = cluster::client().await?;
            let nodes = cluster::nodes(&client).await?;
            let d = doctor::doctor(&nodes, failed_only);
            print!("{}", d.table);
            if d.failed_nodes.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "prerequisites failed on: {} (the Node's {} condition and events say why too)",
                    d.failed_nodes.join(", "),
                    hvx_api::prereq::CONDITION
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Status { all_namespaces } => {
            let client = cluster::client().await?;
            let ns = (!all_namespaces).then(|| {
                cli.namespace
                    .clone()
                    .unwrap_or_else(|| client.default_namespace().to_owned())
            });
            let inputs = cluster::status_inputs(&client, ns.as_deref()).await?;
            print!("{}", status::render(&inputs));
            Ok(ExitCode::SUCCESS)
        }
        Command::Import(args) => import(args, cli.namespace)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Console { vm, app } => {
            let client = cluster::client().await?;
            let ns = cli
                .namespace
                .unwrap_or_else(|| client.default_namespace().to_owned());
            console::attach(&client, &ns, &vm, app.as_deref()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate {
            vm,
            app,
            target_node,
            max_downtime_ms,
            post_copy,
            print,
        } => {
            let build = |app: &str, ns: Option<String>| {
                objects::migration(
                    app,
                    &vm,
                    target_node.clone(),
                    max_downtime_ms,
                    post_copy,
                    ns,
                )
            };
            if print {
                let Some(app) = app else {
                    bail!("--print needs --app (finding the application needs the cluster)");
                };
                let m = build(&app, cli.namespace);
                print!("---\n{}", serde_yaml::to_string(&m)?);
                return Ok(ExitCode::SUCCESS);
            }
            let client = cluster::client().await?;
            let ns = cli
                .namespace
                .unwrap_or_else(|| client.default_namespace().to_owned());
            let app = match app {
                Some(a) => a,
                None => cluster::application_of(&client, &ns, &vm).await?,
            };
            let m = build(&app, Some(ns.clone()));
            let name = cluster::create_migration(&client, &ns, &m).await?;
            println!(
                "vmmigration.hvx.dev/{name} created (watch: kubectl get vmmig -n {ns} {name} -w)"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot { app, name } => {
            let name = name.unwrap_or_else(|| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                objects::default_snapshot_name(now)
            });
            let client = cluster::client().await?;
            let ns = cli
                .namespace
                .unwrap_or_else(|| client.default_namespace().to_owned());
            let changed = cluster::snapshot_app(&client, &ns, &app, &name).await?;
            println!(
                "snapshot {name} requested on {} disk(s) of {app}: {}",
                changed.len(),
                changed.join(", ")
            );
            eprintln!(
                "note: this hvx version records snapshot requests but does not take them on the cluster yet (OverlayDisk condition Degraded=SnapshotsNotTaken)"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_subnets(raw: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    raw.iter()
        .map(|s| {
            let (net, cidr) = s
                .rsplit_once('=')
                .with_context(|| format!("--subnet {s:?}: expected NETWORK=CIDR"))?;
            Ok((net.to_owned(), cidr.to_owned()))
        })
        .collect()
}

async fn import(args: ImportArgs, namespace: Option<String>) -> anyhow::Result<()> {
    let loaded = hvx_import::load(
        &args.file,
        LoadOptions {
            verify_manifest: !args.no_verify,
            deployment_option: args.deployment_option.clone(),
        },
    )
    .with_context(|| format!("cannot import {}", args.file.display()))?;
    let options = MapOptions {
        namespace: namespace.clone(),
        name: args.name.clone(),
        disk_source: match &args.source_url {
            Some(url) => DiskSourceMode::Url(url.clone()),
            None => DiskSourceMode::Upload,
        },
        subnets: parse_subnets(&args.subnets)?,
    };
    let m = manifests::build(&loaded, &options)?;
    if args.dry_run {
        print!("{}", plan::render(&loaded, &m, args.upload));
        return Ok(());
    }
    for w in &m.warnings {
        eprintln!("warning: {w}");
    }
    let docs = render::documents(&m)?;
    match &args.output_dir {
        Some(dir) => {
            for path in render::write_dir(&docs, dir)? {
                eprintln!("wrote {}", path.display());
            }
        }
        None if !args.upload => {
            let mut out = std::io::stdout().lock();
            out.write_all(render::stream(&docs).as_bytes())?;
        }
        None => {}
    }
    if args.upload {
        // Before anything is applied: a missing token is a usage error, not a
        // half-done import.
        let token = match &args.upload_token {
            Some(t) => t.clone(),
            None => {
                let config = kube::Config::infer()
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot load a kubeconfig: {e}"))?;
                let user = kube::config::Kubeconfig::read()
                    .ok()
                    .and_then(|k| {
                        let ctx = k.current_context.clone()?;
                        k.contexts
                            .iter()
                            .find(|c| c.name == ctx)
                            .and_then(|c| c.context.as_ref()?.user.clone())
                    })
                    .unwrap_or_else(|| "(in-cluster)".into());
                kubectl_hvx::credentials::bearer_token(&user, &config.auth_info)?
            }
        };
        let client = cluster::client().await?;
        let ns = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
        cluster::apply_all(&client, &ns, &m).await?;
        let direct = match &args.upload_url {
            Some(url) => Some(HttpEndpoint::new(url, &ns, Some(token.clone()))?),
            None => None,
        };
        let proxy = ProxyEndpoint::new(client.clone(), &args.hvx_namespace, 8081, &ns, token);
        let tuning = Tuning {
            chunk_bytes: usize::try_from(args.upload_chunk_bytes).unwrap_or(8 << 20),
            ..Tuning::default()
        };
        for (disk, file) in &m.disk_files {
            let Some(location) = loaded.disks.get(file) else {
                bail!("disk file {file} vanished");
            };
            let mut progress = Progress::default();
            match &direct {
                Some(ep) => upload::upload(ep, disk, location, tuning, &mut progress).await?,
                None => upload::upload(&proxy, disk, location, tuning, &mut progress).await?,
            };
        }
        eprintln!(
            "imported {} into namespace {ns}",
            m.app.metadata.name.as_deref().unwrap_or("")
        );
    }
    Ok(())
}
