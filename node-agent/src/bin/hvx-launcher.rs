//! hvx-launcher: runs one VM (the container of a VM's pod).
//!
//! ```text
//! hvx-launcher run [--spec FILE]                   # VmSpec or LaunchSpec (else $HVX_LAUNCH_SPEC)
//! hvx-launcher probe [--run-dir DIR]               # readiness: exit 0 iff QEMU is running
//! hvx-launcher console [--run-dir DIR]             # interactive serial console
//! hvx-launcher accel                               # accelerator probe report (JSON)
//! hvx-launcher argv --spec FILE                    # the QEMU command line, dry run
//! ```

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hvx_api::launch::LaunchSpec;
use hvx_api::node::NodePaths;
use hvx_child::Tracker;
use hvx_node_agent::launcher::host::wait_ready;
use hvx_node_agent::launcher::map::{DirResolver, StoreResolver, vm_spec_from_launch};
use hvx_node_agent::launcher::supervise::{
    Incoming, choose_accel, migration_tls_dir, parse_spec, probe_running, run, write_identity,
    write_waiting,
};
use hvx_node_agent::tapfd::TapClient;
use hvx_vmm::accel::ProbeOptions;
use hvx_vmm::migration::TargetEndpoint;
use hvx_vmm::vm::{ExitKind, StartOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Records of this launcher's children in the VM's run dir.
const CHILDREN_DIR: &str = ".children";

#[derive(Parser, Debug)]
#[command(name = "hvx-launcher", about = "Runs one VMware VM on QEMU")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run and supervise the VM until it stops.
    Run(SpecArgs),
    /// Exit 0 iff QEMU reports `running` (the pod's readiness probe).
    Probe(RunDirArgs),
    /// Attach stdin/stdout to the guest's serial console.
    Console(RunDirArgs),
    /// Probe the accelerator and print the report as JSON.
    Accel,
    /// Print the QEMU command line the spec gives.
    Argv {
        #[command(flatten)]
        spec: SpecArgs,
        /// As a JSON array (binary first): arguments may contain spaces.
        #[arg(long)]
        json: bool,
    },
}

/// Where the node keeps hvx state; a LaunchSpec's run dir and disks are found below.
#[derive(clap::Args, Debug, Clone)]
struct NodeArgs {
    /// Node this pod runs on (the downward API sets it in launcher pods).
    #[arg(long, env = "HVX_NODE_NAME")]
    node_name: Option<String>,
    /// Persistent hvx root as mounted in the pod.
    #[arg(long, env = "HVX_STORE_ROOT", default_value = hvx_api::node::DEFAULT_STORE_ROOT)]
    store_root: PathBuf,
    /// Runtime hvx root as mounted in the pod.
    #[arg(long, env = "HVX_RUN_ROOT", default_value = hvx_api::node::DEFAULT_RUN_ROOT)]
    run_root: PathBuf,
}

#[derive(clap::Args, Debug)]
struct RunDirArgs {
    /// The VM's run dir; default: derived from $HVX_LAUNCH_SPEC, else /run/hvx.
    #[arg(long, env = "HVX_RUN_DIR")]
    run_dir: Option<PathBuf>,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(clap::Args, Debug)]
struct SpecArgs {
    /// VmSpec or LaunchSpec JSON file; default: $HVX_LAUNCH_SPEC (JSON text or a path).
    #[arg(long)]
    spec: Option<PathBuf>,
    #[command(flatten)]
    node: NodeArgs,
    /// Longest wait for the node agent to prepare overlays and taps (LaunchSpec).
    #[arg(long, env = "HVX_NODE_WAIT_SECONDS", default_value_t = 3600)]
    node_wait_seconds: u64,
}

fn spec_text(spec: Option<&PathBuf>) -> anyhow::Result<String> {
    Ok(match (spec, std::env::var("HVX_LAUNCH_SPEC")) {
        (Some(p), _) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        (None, Ok(v)) if v.trim_start().starts_with('{') => v,
        (None, Ok(p)) => std::fs::read_to_string(&p)
            .with_context(|| format!("reading HVX_LAUNCH_SPEC file {p}"))?,
        (None, Err(_)) => bail!("no spec: pass --spec FILE or set HVX_LAUNCH_SPEC"),
    })
}

/// A LaunchSpec (from the operator) with its node paths, if the text is one.
fn as_launch(text: &str, node: &NodeArgs) -> anyhow::Result<Option<(LaunchSpec, NodePaths)>> {
    if hvx_vmm::VmSpec::from_json(text).is_ok() {
        return Ok(None);
    }
    let Ok(ls) = serde_json::from_str::<LaunchSpec>(text) else {
        return Ok(None);
    };
    let Some(node_name) = node.node_name.as_deref().filter(|n| !n.is_empty()) else {
        bail!("a LaunchSpec needs the node name: set HVX_NODE_NAME or --node-name");
    };
    let paths = NodePaths::new(&node.store_root, &node.run_root, node_name);
    Ok(Some((ls, paths)))
}

fn run_dir_of(a: &RunDirArgs) -> PathBuf {
    if let Some(d) = &a.run_dir {
        return d.clone();
    }
    match spec_text(None).ok().map(|t| as_launch(&t, &a.node)) {
        Some(Ok(Some((ls, paths)))) => paths.vm_run_dir(&ls.vm_id),
        _ => PathBuf::from(hvx_api::node::DEFAULT_RUN_ROOT),
    }
}

/// What this launcher tells its node agent about itself: its pod (downward API), its
/// application's uid (container spec), the launch spec and its seal (annotation).
fn seal_request(text: String) -> hvx_node_agent::sealcheck::SealCheck {
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    hvx_node_agent::sealcheck::SealCheck {
        namespace: env("HVX_POD_NAMESPACE"),
        pod: env("HVX_POD_NAME"),
        owner_uid: env("HVX_OWNER_UID"),
        spec: text,
        seal: env("HVX_LAUNCH_SEAL"),
    }
}

/// The VmSpec to run, and for a LaunchSpec where its NICs' taps come from (the node
/// agent, by fd). For a LaunchSpec this first waits for the node agent.
async fn load_spec(
    a: &SpecArgs,
    wait: bool,
) -> anyhow::Result<(hvx_vmm::VmSpec, Option<TapClient>)> {
    let text = spec_text(a.spec.as_ref())?;
    let Some((ls, paths)) = as_launch(&text, &a.node)? else {
        // A VmSpec names its own run dir and disk paths.
        let unused = DirResolver {
            dir: PathBuf::from("/nonexistent"),
        };
        return Ok((parse_spec(&text, Path::new("/nonexistent"), &unused)?, None));
    };
    let taps = TapClient {
        path: paths.seal_socket(),
        check: seal_request(text.clone()),
    };
    let run_dir = paths.vm_run_dir(&ls.vm_id);
    if wait {
        write_identity(&run_dir, &ls)?;
    }
    let store = StoreResolver {
        store_root: paths.disk_store(),
        vm_id: ls.vm_id.clone(),
    };
    if wait {
        let started = std::time::Instant::now();
        wait_ready(
            &ls,
            &store,
            || taps.waiting(),
            Duration::from_secs(a.node_wait_seconds),
            |missing| {
                tracing::info!(waiting_for = ?missing, "waiting for the node agent");
                if let Err(e) = write_waiting(&run_dir, missing) {
                    tracing::warn!("{e}");
                }
            },
        )
        .await?;
        tracing::info!(
            waited_ms = started.elapsed().as_millis() as u64,
            "node prepared: overlays and taps in place"
        );
    }
    Ok((vm_spec_from_launch(&ls, &run_dir, &store)?, Some(taps)))
}

/// Has the node agent check the seal of the launch spec in $HVX_LAUNCH_SPEC (a VmSpec
/// is refused: launcher pods carry LaunchSpecs only).
async fn check_seal(a: &SpecArgs) -> anyhow::Result<()> {
    let text = spec_text(None)?;
    let Some((_, paths)) = as_launch(&text, &a.node)? else {
        bail!("$HVX_LAUNCH_SPEC is not a LaunchSpec");
    };
    let req = seal_request(text);
    let answer = hvx_node_agent::sealcheck::ask(
        &paths.seal_socket(),
        &req,
        Duration::from_secs(a.node_wait_seconds.min(120)),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    if !answer.ok {
        bail!(
            "the launch spec of pod {}/{} is not one hvx made for it ({}); the annotation was changed or the pod was not created by hvx",
            req.namespace,
            req.pod,
            answer.reason.unwrap_or_default()
        );
    }
    tracing::info!("launch spec seal checked by the node agent");
    Ok(())
}

async fn terminate() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(a) => {
            // A spec from the pod's annotation runs only once the node agent found
            // its seal valid: before anything is written on the node.
            if a.spec.is_none()
                && let Err(why) = check_seal(&a).await
            {
                let message = format!("hvx-launcher: refusing to start: {why}");
                eprintln!("{message}");
                // The pod's status shows it (terminationMessagePath).
                let _ = std::fs::write("/dev/termination-log", &message);
                std::process::exit(3);
            }
            // Deleted while waiting for the node (or a migration target cancelled
            // before it started): nothing ran, so nothing of this VM stays here.
            let (spec, taps) = tokio::select! {
                s = load_spec(&a, true) => s?,
                () = terminate() => {
                    if let Ok(Some((ls, paths))) = as_launch(&spec_text(a.spec.as_ref())?, &a.node) {
                        let _ = std::fs::remove_dir_all(paths.vm_run_dir(&ls.vm_id));
                    }
                    eprintln!("hvx-launcher: stopped before the VM started");
                    return Ok(());
                }
            };
            let launch = as_launch(&spec_text(a.spec.as_ref())?, &a.node)?;
            let from_operator = launch.is_some();
            let incoming = launch
                .as_ref()
                .and_then(|(ls, _)| ls.incoming.as_ref())
                .map(|inc| {
                    // Never plaintext: a missing key stops the target here.
                    let tls = migration_tls_dir(&spec.run_dir)?;
                    Ok::<_, anyhow::Error>(Incoming {
                        endpoint: TargetEndpoint {
                            // In its own pod network namespace QEMU listens on the
                            // pod's address (the source is sent there); a launcher
                            // run by hand listens where the agent said.
                            host: std::env::var("HVX_POD_IP")
                                .ok()
                                .filter(|ip| !ip.is_empty())
                                .unwrap_or_else(|| inc.host.clone()),
                            migration_port: inc.migration_port,
                            nbd_port: inc.nbd_port,
                        },
                        tls_dir: Some(tls),
                        timeout: Duration::from_secs(a.node_wait_seconds),
                        post_copy: inc.post_copy,
                    })
                })
                .transpose()?;
            // QEMU (and probe) a killed predecessor of this VM's launcher left go
            // before this one starts, and this run's are recorded.
            let children = Tracker::new(spec.run_dir.join(CHILDREN_DIR), "hvx-launcher")?;
            for r in children.reap_stale()? {
                if r.killed {
                    eprintln!(
                        "hvx-launcher: killed leftover {} (pid {}) of an earlier launcher",
                        r.record.what, r.record.process.pid
                    );
                }
            }
            children.install();
            let exit = run(
                &spec,
                &StartOptions::default(),
                &ProbeOptions::default(),
                incoming,
                taps.as_ref(),
                terminate(),
            )
            .await;
            // Every child was waited for: the records are gone, so is their dir.
            let _ = std::fs::remove_dir(spec.run_dir.join(CHILDREN_DIR));
            let exit = exit?;
            eprintln!("hvx-launcher: {exit}");
            // The pod is going away for good (deleted, drained): its run dir on the
            // node goes with it. After a crash it stays, for the logs.
            if from_operator
                && matches!(exit, ExitKind::HostRequested | ExitKind::Migrated)
                && let Err(e) = std::fs::remove_dir_all(&spec.run_dir)
            {
                eprintln!("hvx-launcher: removing {}: {e}", spec.run_dir.display());
            }
            match exit {
                ExitKind::Crashed { .. } => std::process::exit(1),
                ExitKind::GuestPoweroff | ExitKind::HostRequested | ExitKind::Migrated => Ok(()),
            }
        }
        Cmd::Probe(a) => match probe_running(&run_dir_of(&a), Duration::from_secs(3)).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                eprintln!("hvx-launcher: VM is not running");
                std::process::exit(1)
            }
            Err(e) => {
                eprintln!("hvx-launcher: {e}");
                std::process::exit(1)
            }
        },
        Cmd::Console(a) => {
            let run_dir = run_dir_of(&a);
            let con =
                hvx_vmm::console::SerialConsole::connect(&hvx_vmm::RunPaths::new(&run_dir).serial)
                    .await?;
            let (mut r, mut w) = con.into_stream().into_split();
            let mut stdin = tokio::io::stdin();
            let mut stdout = tokio::io::stdout();
            tokio::select! {
                r1 = tokio::io::copy(&mut stdin, &mut w) => { r1?; }
                r2 = tokio::io::copy(&mut r, &mut stdout) => { r2?; }
            }
            Ok(())
        }
        Cmd::Accel => {
            let spec_auto =
                hvx_vmm::VmSpec::from_json(r#"{"name":"probe","memory_mib":64,"run_dir":"/tmp"}"#)?;
            let report = choose_accel(&spec_auto, &ProbeOptions::default()).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Cmd::Argv { spec: a, json } => {
            let (spec, _) = load_spec(&a, false).await?;
            hvx_vmm::validate(&spec)?;
            let argv = hvx_vmm::build_argv(
                &spec,
                hvx_vmm::Accel::Tcg,
                &hvx_vmm::RunPaths::new(&spec.run_dir),
            );
            if json {
                let mut all = vec![hvx_vmm::argv::QEMU_BINARY.to_string()];
                all.extend(argv);
                println!("{}", serde_json::to_string(&all)?);
            } else {
                println!("{} {}", hvx_vmm::argv::QEMU_BINARY, argv.join(" "));
            }
            Ok(())
        }
    }
}
