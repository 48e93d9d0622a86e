//! hvx-launcher: runs one VM (the container of a VM's pod).
//!
//! ```text
//! hvx-launcher run [--spec FILE] [--run-dir DIR]   # VmSpec or LaunchSpec (else $HVX_LAUNCH_SPEC)
//! hvx-launcher probe [--run-dir DIR]               # readiness: exit 0 iff QEMU is running
//! hvx-launcher console [--run-dir DIR]             # interactive serial console
//! hvx-launcher accel                               # accelerator probe report (JSON)
//! hvx-launcher argv --spec FILE                    # the QEMU command line, dry run
//! ```

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hvx_node_agent::launcher::map::DirResolver;
use hvx_node_agent::launcher::supervise::{choose_accel, parse_spec, probe_running, run};
use hvx_vmm::accel::ProbeOptions;
use hvx_vmm::vm::{ExitKind, StartOptions};
use std::path::PathBuf;
use std::time::Duration;

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
    Probe {
        #[arg(long, env = "HVX_RUN_DIR", default_value = "/run/hvx")]
        run_dir: PathBuf,
    },
    /// Attach stdin/stdout to the guest's serial console.
    Console {
        #[arg(long, env = "HVX_RUN_DIR", default_value = "/run/hvx")]
        run_dir: PathBuf,
    },
    /// Probe the accelerator and print the report as JSON.
    Accel,
    /// Print the QEMU command line the spec gives.
    Argv(SpecArgs),
}

#[derive(clap::Args, Debug)]
struct SpecArgs {
    /// VmSpec or LaunchSpec JSON file; default: $HVX_LAUNCH_SPEC (JSON text or a path).
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Run dir for a LaunchSpec (a VmSpec names its own).
    #[arg(long, env = "HVX_RUN_DIR", default_value = "/run/hvx")]
    run_dir: PathBuf,
    /// Node disk store as mounted in the pod (LaunchSpec disk resolution).
    #[arg(long, env = "HVX_DISK_DIR", default_value = "/var/lib/hvx/disks")]
    disk_dir: PathBuf,
}

fn load_spec(a: &SpecArgs) -> anyhow::Result<hvx_vmm::VmSpec> {
    let text = match (&a.spec, std::env::var("HVX_LAUNCH_SPEC")) {
        (Some(p), _) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        (None, Ok(v)) if v.trim_start().starts_with('{') => v,
        (None, Ok(p)) => std::fs::read_to_string(&p)
            .with_context(|| format!("reading HVX_LAUNCH_SPEC file {p}"))?,
        (None, Err(_)) => bail!("no spec: pass --spec FILE or set HVX_LAUNCH_SPEC"),
    };
    let resolver = DirResolver {
        dir: a.disk_dir.clone(),
    };
    Ok(parse_spec(&text, &a.run_dir, &resolver)?)
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
            let spec = load_spec(&a)?;
            let exit = run(
                &spec,
                &StartOptions::default(),
                &ProbeOptions::default(),
                terminate(),
            )
            .await?;
            eprintln!("hvx-launcher: {exit}");
            match exit {
                ExitKind::Crashed { .. } => std::process::exit(1),
                ExitKind::GuestPoweroff | ExitKind::HostRequested => Ok(()),
            }
        }
        Cmd::Probe { run_dir } => match probe_running(&run_dir, Duration::from_secs(3)).await {
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
        Cmd::Console { run_dir } => {
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
        Cmd::Argv(a) => {
            let spec = load_spec(&a)?;
            hvx_vmm::validate(&spec)?;
            let argv = hvx_vmm::build_argv(
                &spec,
                hvx_vmm::Accel::Tcg,
                &hvx_vmm::RunPaths::new(&spec.run_dir),
            );
            println!("{} {}", hvx_vmm::argv::QEMU_BINARY, argv.join(" "));
            Ok(())
        }
    }
}
