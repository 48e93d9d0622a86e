//! One running QEMU: start (optionally from a suspend file), lifecycle operations over
//! QMP, exit classification and clean-up of everything in the run dir.

use crate::argv::{Accel, OVMF_VARS, QEMU_BINARY, RunPaths, build_argv};
use crate::error::io_err;
use crate::qmp::{QmpClient, QmpEvent};
use crate::spec::{Firmware, RestartKind, RestartPolicy, VmSpec};
use crate::{Result, VmmError, validate};
use serde_json::json;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How often `shutdown` presses the ACPI power button again during its grace period.
const POWER_BUTTON_REPEAT: Duration = Duration::from_secs(5);
/// How to start QEMU.
#[derive(Clone, Debug)]
pub struct StartOptions {
    /// QEMU binary.
    pub qemu: String,
    /// Resume from a file written by `Vm::suspend`.
    pub resume_from: Option<PathBuf>,
    /// Start as a live-migration target: `-incoming defer -S`, nothing loaded; the
    /// caller drives `migration::listen_incoming` / `finish_incoming`.
    pub incoming: bool,
    /// Bound on QEMU start-up until QMP answers.
    pub start_timeout: Duration,
    /// Bound on each QMP command.
    pub qmp_timeout: Duration,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self {
            qemu: QEMU_BINARY.to_string(),
            resume_from: None,
            incoming: false,
            start_timeout: Duration::from_secs(30),
            qmp_timeout: Duration::from_secs(30),
        }
    }
}

/// Why QEMU exited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// The guest powered itself off (or ACPI shutdown completed).
    GuestPoweroff,
    /// We asked QEMU to quit (power off, suspend).
    HostRequested,
    /// The VM live-migrated to another node and this QEMU was then stopped.
    Migrated,
    /// QEMU died on its own: a crash or a kill from outside.
    Crashed {
        /// Exit status as text.
        status: String,
        /// The last lines QEMU wrote on stderr.
        stderr: String,
    },
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GuestPoweroff => write!(f, "guest powered off"),
            Self::HostRequested => write!(f, "stopped by the launcher"),
            Self::Migrated => write!(f, "migrated to another node"),
            Self::Crashed { status, stderr } if stderr.is_empty() => {
                write!(f, "QEMU crashed ({status})")
            }
            Self::Crashed { status, stderr } => write!(f, "QEMU crashed ({status}): {stderr}"),
        }
    }
}

/// Pure restart decision: restart after `exit` given the policy and restarts so far?
pub fn should_restart(policy: &RestartPolicy, exit: &ExitKind, restarts: u32) -> bool {
    if restarts >= policy.max_restarts {
        return false;
    }
    match (policy.policy, exit) {
        (_, ExitKind::HostRequested | ExitKind::Migrated) | (RestartKind::Never, _) => false,
        (RestartKind::OnFailure, ExitKind::Crashed { .. }) => true,
        (RestartKind::OnFailure, ExitKind::GuestPoweroff) => false,
        (RestartKind::Always, _) => true,
    }
}

/// How an ACPI shutdown ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// The guest shut down within the grace period.
    Graceful,
    /// The grace period passed; the VM was powered off.
    PoweredOff,
}

/// A QEMU process and its QMP session.
#[derive(Debug)]
pub struct Vm {
    paths: RunPaths,
    run_dir: PathBuf,
    accel: Accel,
    child: Child,
    qmp: QmpClient,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    last_shutdown: Arc<Mutex<Option<QmpEvent>>>,
    host_requested: bool,
    exit: Option<ExitStatus>,
    /// On-disk record of this QEMU; dropped with the `Vm` (QEMU is gone by then).
    _record: hvx_child::Tracked,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoning only means a reader task panicked; the data is still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Vm {
    /// Validates the spec, prepares the run dir and starts QEMU; returns once QMP is
    /// negotiated (and, with `resume_from`, once the saved state is loaded and running).
    pub async fn start(spec: &VmSpec, accel: Accel, opts: &StartOptions) -> Result<Self> {
        validate(spec)?;
        let paths = RunPaths::new(&spec.run_dir);
        std::fs::create_dir_all(&spec.run_dir)
            .map_err(io_err("creating run dir", &spec.run_dir))?;
        for stale in [
            &spec.run_dir.join(crate::migration::MIGRATED_MARKER),
            &paths.qmp,
            &paths.qmp_probe,
            &paths.qmp_agent,
            &paths.serial,
            &paths.vnc,
            &paths.pidfile,
        ] {
            remove_if_exists(stale)?;
        }
        if spec.firmware == Firmware::Efi && !paths.efi_vars.exists() {
            std::fs::copy(OVMF_VARS, &paths.efi_vars)
                .map_err(io_err("copying OVMF variables to", &paths.efi_vars))?;
        }
        if let Some(file) = &opts.resume_from
            && !file.is_file()
        {
            return Err(VmmError::Migration {
                op: "resume",
                reason: format!("{} does not exist", file.display()),
            });
        }
        let mut argv = build_argv(spec, accel, &paths);
        if opts.resume_from.is_some() || opts.incoming {
            argv.extend(["-incoming".to_string(), "defer".to_string()]);
        }
        if opts.incoming {
            // Paused after the final state arrives: the disks are switched over first.
            argv.push("-S".to_string());
        }
        tracing::info!(vm = %spec.name, accel = accel.as_str(), "starting QEMU: {} {}", opts.qemu, argv.join(" "));
        let mut cmd = Command::new(&opts.qemu);
        cmd.args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // NIC taps the node agent passed: QEMU inherits exactly these (`fd=`).
        let tap_fds: Vec<i32> = spec
            .nics
            .iter()
            .filter_map(|n| match n.backend {
                crate::spec::NicBackend::Tap { fd, .. } => fd,
                _ => None,
            })
            .collect();
        hvx_child::keep_fds(cmd.as_std_mut(), tap_fds);
        // Dies with the launcher (by design no QEMU outlives it: a new launcher
        // starts the VM afresh), and recorded so the next launcher reaps one that
        // escaped.
        let mut child = hvx_child::spawn_tokio(cmd)
            .await
            .map_err(|source| VmmError::Spawn {
                binary: opts.qemu.clone(),
                source,
            })?;
        let record = hvx_child::Tracker::track_global(child.id(), "qemu");
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(err) = child.stderr.take() {
            tokio::spawn(collect_stderr(err, stderr_tail.clone()));
        }
        let connect = QmpClient::connect(&paths.qmp, opts.start_timeout);
        let qmp = tokio::select! {
            q = connect => match q {
                Ok(q) => q,
                Err(e) => {
                    // QEMU dying during start-up can reset the QMP connection before
                    // its exit is seen: then the exit and its stderr are the error.
                    if let Ok(Ok(status)) =
                        tokio::time::timeout(Duration::from_secs(2), child.wait()).await
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        cleanup_files(&paths);
                        return Err(VmmError::EarlyExit {
                            status: status.to_string(),
                            stderr: tail_text(&stderr_tail),
                        });
                    }
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    cleanup_files(&paths);
                    return Err(e);
                }
            },
            status = child.wait() => {
                // Give the stderr reader a moment to drain QEMU's last words.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let stderr = tail_text(&stderr_tail);
                cleanup_files(&paths);
                return Err(VmmError::EarlyExit {
                    status: status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                    stderr,
                });
            }
        };
        let last_shutdown = Arc::new(Mutex::new(None));
        tokio::spawn(track_shutdown(qmp.subscribe(), last_shutdown.clone()));
        let mut vm = Self {
            paths,
            run_dir: spec.run_dir.clone(),
            accel,
            child,
            qmp,
            stderr_tail,
            last_shutdown,
            host_requested: false,
            exit: None,
            _record: record,
        };
        if let Some(file) = &opts.resume_from {
            vm.load_state(file).await?;
        }
        Ok(vm)
    }

    async fn load_state(&mut self, file: &Path) -> Result<()> {
        let uri = format!("file:{}", file.display());
        self.qmp
            .execute("migrate-incoming", Some(json!({"uri": uri})))
            .await?;
        self.wait_migration("resume", Duration::from_secs(300))
            .await?;
        self.qmp.execute("cont", None).await?;
        Ok(())
    }

    /// The QMP session.
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// The run dir's files.
    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The last lines QEMU wrote on stderr (for error reports).
    pub fn stderr_tail(&self) -> String {
        tail_text(&self.stderr_tail)
    }

    /// QEMU's pid (None once reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// QMP run state.
    pub async fn run_state(&self) -> Result<String> {
        self.qmp.run_state().await
    }

    /// Waits until QMP reports `running`.
    pub async fn wait_running(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.qmp.run_state().await? == "running" {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VmmError::Timeout {
                    what: "run state running".into(),
                    secs: timeout.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Pauses the vCPUs.
    pub async fn pause(&self) -> Result<()> {
        self.qmp.execute("stop", None).await.map(drop)
    }

    /// Resumes the vCPUs.
    pub async fn resume(&self) -> Result<()> {
        self.qmp.execute("cont", None).await.map(drop)
    }

    /// Hard reset (the reset button).
    pub async fn reset(&self) -> Result<()> {
        self.qmp.execute("system_reset", None).await.map(drop)
    }

    /// Sets the balloon target (needs `balloon: true`).
    pub async fn set_balloon(&self, bytes: u64) -> Result<()> {
        self.qmp
            .execute("balloon", Some(json!({"value": bytes})))
            .await
            .map(drop)
    }

    /// ACPI power button, then power-off if the guest has not stopped within `grace`.
    pub async fn shutdown(&mut self, grace: Duration) -> Result<ShutdownOutcome> {
        // The power button is pressed again every few seconds of the grace period: a
        // guest that was still starting its ACPI handler when the first press came
        // (a guest just booted, a busy node) drops that press and would otherwise be
        // powered off at the end of the grace period without having shut down.
        let deadline = tokio::time::Instant::now() + grace;
        self.qmp.execute("system_powerdown", None).await?;
        loop {
            let until = (tokio::time::Instant::now() + POWER_BUTTON_REPEAT).min(deadline);
            match tokio::time::timeout_at(until, self.child.wait()).await {
                Ok(status) => {
                    self.exit = status.ok();
                    return Ok(ShutdownOutcome::Graceful);
                }
                Err(_) if until < deadline => {
                    // QEMU may be exiting already: its exit is what counts.
                    if !self.qmp.is_closed() {
                        let _ = self
                            .qmp
                            .execute_timeout("system_powerdown", None, Duration::from_secs(2))
                            .await;
                    }
                }
                Err(_) => {
                    self.power_off().await?;
                    return Ok(ShutdownOutcome::PoweredOff);
                }
            }
        }
    }

    /// Immediate power-off: QMP `quit`, then SIGKILL if QEMU does not exit in 10 s.
    pub async fn power_off(&mut self) -> Result<()> {
        self.host_requested = true;
        if self.exit.is_some() {
            return Ok(());
        }
        if !self.qmp.is_closed() {
            // QEMU may exit before it replies; the wait below is what counts.
            let _ = self
                .qmp
                .execute_timeout("quit", None, Duration::from_secs(5))
                .await;
        }
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(status) => self.exit = status.ok(),
            Err(_) => {
                let _ = self.child.start_kill();
                self.exit = self.child.wait().await.ok();
            }
        }
        Ok(())
    }

    /// Suspends to `file`: pauses, writes the whole VM state (RAM and devices) with a
    /// file migration, and stops QEMU. Disks are not copied: resume with the same disks.
    pub async fn suspend(&mut self, file: &Path) -> Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(io_err("creating suspend dir", dir))?;
        }
        self.qmp.execute("stop", None).await?;
        let uri = format!("file:{}", file.display());
        self.qmp
            .execute("migrate", Some(json!({"uri": uri})))
            .await?;
        if let Err(e) = self
            .wait_migration("suspend", Duration::from_secs(300))
            .await
        {
            let _ = std::fs::remove_file(file);
            // Leave the VM running as it was rather than half-suspended.
            let _ = self.qmp.execute("cont", None).await;
            return Err(e);
        }
        self.power_off().await
    }

    async fn wait_migration(&self, op: &'static str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.qmp.execute("query-migrate", None).await?;
            match v.get("status").and_then(|s| s.as_str()).unwrap_or("none") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let reason = v
                        .get("error-desc")
                        .and_then(|s| s.as_str())
                        .unwrap_or("no reason given");
                    return Err(VmmError::Migration {
                        op,
                        reason: reason.to_string(),
                    });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(VmmError::Timeout {
                    what: format!("{op} to complete"),
                    secs: timeout.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for QEMU to exit and says why it did.
    pub async fn wait_exit(&mut self) -> ExitKind {
        let status = match self.exit {
            Some(s) => Some(s),
            None => self.child.wait().await.ok(),
        };
        self.exit = status;
        // Let the QMP reader deliver the SHUTDOWN event that preceded the exit.
        tokio::time::timeout(Duration::from_secs(2), self.qmp.closed())
            .await
            .ok();
        let shutdown = lock(&self.last_shutdown).clone();
        // The node agent drops the marker after a completed outgoing migration, just
        // before it stops this QEMU.
        if !self.host_requested
            && self
                .run_dir
                .join(crate::migration::MIGRATED_MARKER)
                .exists()
        {
            return ExitKind::Migrated;
        }
        classify_exit(
            self.host_requested,
            status,
            shutdown.as_ref(),
            tail_text(&self.stderr_tail),
        )
    }

    /// Stops QEMU if it still runs and removes every file in the run dir this VM
    /// created (sockets, pid file, serial log, EFI vars), and the dir if then empty.
    pub async fn stop_and_cleanup(mut self) -> Result<()> {
        self.power_off().await?;
        cleanup_files(&self.paths);
        let _ = std::fs::remove_file(&self.paths.serial_log);
        // The launcher's size cap keeps one rotated generation beside it.
        let _ = std::fs::remove_file(hvx_child::rotated_log(&self.paths.serial_log));
        let _ = std::fs::remove_file(&self.paths.efi_vars);
        // Only removes the dir when nothing else lives there.
        let _ = std::fs::remove_dir(&self.run_dir);
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // kill_on_drop ends QEMU; its sockets would stay behind without this.
        let _ = self.child.start_kill();
        cleanup_files(&self.paths);
    }
}

/// Pure exit classification.
pub fn classify_exit(
    host_requested: bool,
    status: Option<ExitStatus>,
    shutdown: Option<&QmpEvent>,
    stderr: String,
) -> ExitKind {
    if host_requested {
        return ExitKind::HostRequested;
    }
    let guest = shutdown
        .and_then(|e| e.data.get("guest"))
        .and_then(|g| g.as_bool())
        .unwrap_or(false);
    let ok = status.is_some_and(|s| s.success());
    if guest && ok {
        return ExitKind::GuestPoweroff;
    }
    let status = match status {
        Some(s) => s.to_string(),
        None => "unknown status".to_string(),
    };
    ExitKind::Crashed { status, stderr }
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("removing stale", p)(e)),
        _ => Ok(()),
    }
}

fn cleanup_files(paths: &RunPaths) {
    for p in [
        &paths.qmp,
        &paths.qmp_probe,
        &paths.qmp_agent,
        &paths.serial,
        &paths.vnc,
        &paths.pidfile,
    ] {
        let _ = std::fs::remove_file(p);
    }
}

fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    lock(tail).iter().cloned().collect::<Vec<_>>().join(" | ")
}

async fn collect_stderr(err: tokio::process::ChildStderr, tail: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(err).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::warn!(target: "qemu", "{line}");
        let mut t = lock(&tail);
        if t.len() == 10 {
            t.pop_front();
        }
        t.push_back(line);
    }
}

async fn track_shutdown(
    mut rx: tokio::sync::broadcast::Receiver<QmpEvent>,
    last: Arc<Mutex<Option<QmpEvent>>>,
) {
    loop {
        match rx.recv().await {
            Ok(ev) if ev.event == "SHUTDOWN" => *lock(&last) = Some(ev),
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(_) => return,
        }
    }
}
