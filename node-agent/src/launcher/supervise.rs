//! Supervision: choose the accelerator, start QEMU, follow the restart policy, turn
//! SIGTERM into an ACPI shutdown with a grace period, and record status for the pod.

use super::LauncherError;
use super::map::{DiskResolver, vm_spec_from_launch};
use hvx_api::launch::LaunchSpec;
use hvx_api::launch::LauncherPhase;
use hvx_vmm::accel::{AcceleratorReport, ProbeOptions, check_accelerator, probe_accelerator};
use hvx_vmm::spec::AcceleratorChoice;
use hvx_vmm::vm::{ExitKind, StartOptions, Vm, should_restart};
use hvx_vmm::{Accel, VmSpec};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Parses launcher input: an hvx-vmm `VmSpec`, or the operator's `LaunchSpec` (mapped,
/// with disks resolved by `resolver`, sockets under `run_dir`).
pub fn parse_spec(
    text: &str,
    run_dir: &Path,
    resolver: &dyn DiskResolver,
) -> Result<VmSpec, LauncherError> {
    let vm_err = match VmSpec::from_json(text) {
        Ok(spec) => return Ok(spec),
        Err(e) => e.to_string(),
    };
    match serde_json::from_str::<LaunchSpec>(text) {
        Ok(ls) => vm_spec_from_launch(&ls, run_dir, resolver),
        Err(e) => Err(LauncherError::ParseSpec {
            vm: vm_err,
            launch: e.to_string(),
        }),
    }
}

/// What the launcher reports in `<run_dir>/status.json`.
#[derive(Clone, Debug, Serialize)]
pub struct LauncherStatus {
    /// Where the launcher is.
    pub phase: LauncherPhase,
    /// Accelerator and why.
    pub accel: Option<AcceleratorReport>,
    /// QEMU restarts so far.
    pub restarts: u32,
    /// Why QEMU last exited.
    pub last_exit: Option<String>,
    /// QEMU's pid while running.
    pub qemu_pid: Option<u32>,
    /// What the node still lacks before the VM can boot (phase WaitingForNode).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
}

/// Who the VM in a run dir is (`vm.json`, written once by the launcher of an
/// operator-made pod): the node agent finds VMs, their NICs and taps through it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmIdentity {
    /// `<app uid>/<vm>`.
    pub vm_id: String,
    /// VM name.
    pub name: String,
    /// NICs.
    pub nics: Vec<IdentityNic>,
}

/// One NIC of a [`VmIdentity`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityNic {
    /// NIC name.
    pub name: String,
    /// MAC, lowercase.
    pub mac: String,
    /// Host tap.
    pub tap: String,
}

/// The identity file of a run dir.
pub fn identity_path(run_dir: &Path) -> PathBuf {
    run_dir.join("vm.json")
}

/// Writes `vm.json` (temp file + rename).
pub fn write_identity(run_dir: &Path, ls: &LaunchSpec) -> Result<(), LauncherError> {
    let id = VmIdentity {
        vm_id: ls.vm_id.clone(),
        name: ls.vm.name.clone(),
        nics: ls
            .nics
            .iter()
            .filter_map(|n| {
                let d = ls.vm.nics.iter().find(|d| d.name == n.name)?;
                Some(IdentityNic {
                    name: n.name.clone(),
                    mac: d.mac_address.to_ascii_lowercase(),
                    tap: n.tap.clone(),
                })
            })
            .collect(),
    };
    let err = |source| LauncherError::Status {
        path: identity_path(run_dir),
        source,
    };
    std::fs::create_dir_all(run_dir).map_err(err)?;
    let tmp = run_dir.join(".vm.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&id).unwrap_or_default()).map_err(err)?;
    std::fs::rename(&tmp, identity_path(run_dir)).map_err(err)
}

/// Records that the VM waits for the node agent (overlays, taps).
pub fn write_waiting(run_dir: &Path, missing: &[String]) -> Result<(), LauncherError> {
    std::fs::create_dir_all(run_dir).map_err(|source| LauncherError::Status {
        path: run_dir.to_path_buf(),
        source,
    })?;
    write_status(
        run_dir,
        &LauncherStatus {
            phase: LauncherPhase::WaitingForNode,
            accel: None,
            restarts: 0,
            last_exit: None,
            qemu_pid: None,
            waiting_for: missing.to_vec(),
        },
    )
}

/// The status file of a run dir.
pub fn status_path(run_dir: &Path) -> PathBuf {
    run_dir.join("status.json")
}

fn write_status(run_dir: &Path, s: &LauncherStatus) -> Result<(), LauncherError> {
    let path = status_path(run_dir);
    let tmp = run_dir.join(".status.json.tmp");
    let text = serde_json::to_string_pretty(s).unwrap_or_default();
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| LauncherError::Status { path, source })
}

/// The accelerator for this VM: forced by the spec, or probed.
pub async fn choose_accel(
    spec: &VmSpec,
    probe: &ProbeOptions,
) -> Result<AcceleratorReport, LauncherError> {
    Ok(match spec.accelerator {
        AcceleratorChoice::Auto => probe_accelerator(probe).await,
        AcceleratorChoice::Tcg => AcceleratorReport {
            accel: Accel::Tcg,
            reason: "tcg: forced by the VM spec".into(),
            cpu_model: Accel::Tcg.cpu_model().into(),
        },
        AcceleratorChoice::Kvm => {
            check_accelerator(probe, Accel::Kvm).await?;
            AcceleratorReport {
                accel: Accel::Kvm,
                reason: "kvm: forced by the VM spec, probe booted".into(),
                cpu_model: Accel::Kvm.cpu_model().into(),
            }
        }
    })
}

/// A live migration this launcher receives instead of booting the VM.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// Where QEMU listens.
    pub endpoint: hvx_vmm::migration::TargetEndpoint,
    /// Directory with the migration's TLS-PSK key (None: plain TCP, tests only;
    /// `hvx-launcher` refuses to start a target without a key).
    pub tls_dir: Option<PathBuf>,
    /// Longest wait for the source to send the VM.
    pub timeout: Duration,
    /// The source may switch to post-copy (QEMU needs `postcopy-ram` before it starts).
    pub post_copy: bool,
}

/// The directory holding a migration target's key (`keys.psk`, written by the agent
/// before the operator starts the target pod). A missing key is an error: listening
/// anyway would accept a VM's memory and disks in plaintext from anyone who reaches
/// the port.
pub fn migration_tls_dir(run_dir: &Path) -> Result<PathBuf, LauncherError> {
    let dir = run_dir.join(hvx_api::node::MIGRATION_TLS_DIR);
    let key = dir.join("keys.psk");
    if key.is_file() {
        Ok(dir)
    } else {
        Err(LauncherError::NoMigrationKey { key })
    }
}

/// Runs the VM until it stops for good; returns why it last exited. `stop` resolves
/// when the pod is asked to terminate. With `incoming`, the first QEMU receives the
/// running VM from a live migration (phase `Incoming` until it arrives); restarts
/// after that boot normally. With `taps`, every QEMU start gets its NICs' tap fds
/// from the node agent afresh (the launcher holds none while QEMU runs).
pub async fn run(
    spec: &VmSpec,
    start: &StartOptions,
    probe: &ProbeOptions,
    incoming: Option<Incoming>,
    taps: Option<&crate::tapfd::TapClient>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ExitKind, LauncherError> {
    hvx_vmm::validate(spec)?;
    std::fs::create_dir_all(&spec.run_dir).map_err(|source| LauncherError::Status {
        path: spec.run_dir.clone(),
        source,
    })?;
    let report = choose_accel(spec, probe).await?;
    tracing::info!(accel = report.accel.as_str(), reason = %report.reason, "accelerator chosen");
    let mut status = LauncherStatus {
        phase: LauncherPhase::Starting,
        accel: Some(report.clone()),
        restarts: 0,
        last_exit: None,
        qemu_pid: None,
        waiting_for: Vec::new(),
    };
    write_status(&spec.run_dir, &status)?;
    tokio::pin!(stop);
    let mut incoming = incoming;
    loop {
        let opts = StartOptions {
            incoming: incoming.is_some(),
            ..start.clone()
        };
        let started = async {
            let Some(taps) = taps else {
                return Vm::start(spec, report.accel, &opts)
                    .await
                    .map_err(LauncherError::from);
            };
            let fds = taps
                .open()
                .await
                .map_err(|e| LauncherError::Map(format!("the NICs' taps: {e}")))?;
            let with_fds = crate::tapfd::with_tap_fds(spec, &fds).map_err(LauncherError::Map)?;
            // QEMU inherited its copies: the launcher's close when `fds` drops here.
            Vm::start(&with_fds, report.accel, &opts)
                .await
                .map_err(LauncherError::from)
        };
        let mut vm = match started.await {
            Ok(vm) => vm,
            Err(e) => {
                status.phase = LauncherPhase::Failed;
                status.last_exit = Some(e.to_string());
                write_status(&spec.run_dir, &status)?;
                return Err(e);
            }
        };
        let _serial_cap = cap_serial_log(&spec.run_dir);
        if let Some(inc) = incoming.take() {
            status.qemu_pid = vm.pid();
            let received = async {
                let disks: Vec<String> = spec.disks.iter().map(|d| d.name.clone()).collect();
                hvx_vmm::migration::listen_incoming(
                    vm.qmp(),
                    &inc.endpoint,
                    &disks,
                    inc.tls_dir.as_deref(),
                    inc.post_copy,
                )
                .await
                .map_err(|e| e.to_string())?;
                // The operator starts the source when it reads `Incoming`: only now do
                // the NBD exports and the memory listener exist for it to connect to.
                status.phase = LauncherPhase::Incoming;
                write_status(&spec.run_dir, &status).map_err(|e| e.to_string())?;
                tracing::info!(endpoint = ?inc.endpoint, "waiting for the migrating VM");
                hvx_vmm::migration::finish_incoming(vm.qmp(), inc.timeout)
                    .await
                    .map_err(|e| e.to_string())
            };
            let outcome = tokio::select! {
                r = received => Some(r),
                () = &mut stop => None,
            };
            match outcome {
                Some(Ok(resume_ms)) => {
                    tracing::info!(resume_ms, "migration received; VM running here");
                    // The migration's key has served (QEMU read it at the handshake).
                    if let Some(dir) = &inc.tls_dir {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                }
                failed => {
                    // Cancelled, failed or the source gave up: this QEMU never ran the
                    // guest, so there is nothing to shut down gracefully.
                    let why = match failed {
                        Some(Err(e)) => e,
                        _ => "stopped while waiting for the migration".to_string(),
                    };
                    tracing::warn!(%why, "incoming migration did not complete");
                    vm.stop_and_cleanup().await?;
                    status.phase = LauncherPhase::Stopped;
                    status.qemu_pid = None;
                    status.last_exit = Some(format!("incoming migration: {why}"));
                    write_status(&spec.run_dir, &status)?;
                    return Ok(ExitKind::HostRequested);
                }
            }
        }
        status.phase = LauncherPhase::Running;
        status.qemu_pid = vm.pid();
        write_status(&spec.run_dir, &status)?;
        enum Next {
            Exited(ExitKind),
            Stop,
        }
        let next = tokio::select! {
            exit = vm.wait_exit() => Next::Exited(exit),
            () = &mut stop => Next::Stop,
        };
        match next {
            Next::Stop => {
                let grace = Duration::from_secs(u64::from(spec.shutdown_timeout_s));
                let outcome = vm.shutdown(grace).await;
                tracing::info!(?outcome, "VM stopped on request");
                vm.stop_and_cleanup().await?;
                status.phase = LauncherPhase::Stopped;
                status.qemu_pid = None;
                status.last_exit = Some(ExitKind::HostRequested.to_string());
                write_status(&spec.run_dir, &status)?;
                return Ok(ExitKind::HostRequested);
            }
            Next::Exited(exit) => {
                tracing::warn!(%exit, "QEMU exited");
                drop(vm);
                status.last_exit = Some(exit.to_string());
                status.qemu_pid = None;
                if should_restart(&spec.restart_policy, &exit, status.restarts) {
                    status.restarts += 1;
                    status.phase = LauncherPhase::Restarting;
                    write_status(&spec.run_dir, &status)?;
                    continue;
                }
                status.phase = if matches!(exit, ExitKind::Crashed { .. }) {
                    LauncherPhase::Failed
                } else {
                    LauncherPhase::Stopped
                };
                write_status(&spec.run_dir, &status)?;
                return Ok(exit);
            }
        }
    }
}

/// Largest serial log kept in the VM's run dir (tmpfs) before it is rotated to
/// `serial.log.1`: a guest printing to its console all day would fill `/run`.
pub const SERIAL_LOG_MAX_BYTES: u64 = 8 << 20;

/// Aborts its task when dropped: the serial log capper lives as long as one QEMU.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Checks the serial log every 30 s and rotates it past [`SERIAL_LOG_MAX_BYTES`].
fn cap_serial_log(run_dir: &Path) -> AbortOnDrop {
    let log = hvx_vmm::RunPaths::new(run_dir).serial_log;
    AbortOnDrop(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            match hvx_child::cap_log(&log, SERIAL_LOG_MAX_BYTES) {
                Ok(true) => tracing::info!(log = %log.display(), "serial log rotated"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(log = %log.display(), error = %e, "rotating the serial log")
                }
            }
        }
    }))
}

/// Readiness: exit 0 iff QEMU answers `running` on the probe QMP socket.
pub async fn probe_running(run_dir: &Path, timeout: Duration) -> Result<bool, LauncherError> {
    let paths = hvx_vmm::RunPaths::new(run_dir);
    let qmp = hvx_vmm::qmp::QmpClient::connect(&paths.qmp_probe, timeout).await?;
    Ok(qmp.run_state().await? == "running")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_target_without_a_key_refuses_to_listen() {
        let run_dir = tempfile::tempdir().expect("tempdir");
        let err = migration_tls_dir(run_dir.path()).expect_err("no key");
        assert!(err.to_string().contains("refusing to listen"), "{err}");
        let dir = run_dir.path().join(hvx_api::node::MIGRATION_TLS_DIR);
        hvx_vmm::migration::write_psk(&dir, &[7u8; 32]).expect("write key");
        assert_eq!(migration_tls_dir(run_dir.path()).expect("key"), dir);
    }
}
