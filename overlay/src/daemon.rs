//! Lifecycle of the per-network dnsmasq: files in the network's state directory,
//! the daemon found again after an agent restart. It is the one process hvx starts
//! that is meant to outlive its starter (it daemonizes, so DHCP and DNS keep working
//! while the agent process is down): it is recorded in `dnsmasq.proc.json` (pid,
//! start time, owner) and the next agent adopts it only if pid *and* start time still
//! match, else starts a new one; networks no longer wanted are torn down with their
//! dnsmasq. In a pod, containerd kills it with the agent container (see
//! docs/architecture.md, "Process lifetimes").

use std::path::{Path, PathBuf};

use hvx_child::{Owner, ProcId, ProcRecord};
use std::time::{Duration, Instant};

use crate::dnsmasq::{DnsmasqConfig, DnsmasqPaths};
use crate::error::{OverlayError, Result};
use crate::host::{Host, run, write_file};

/// What [`ensure`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonAction {
    Unchanged,
    Started,
    Restarted,
    Reloaded,
}

/// The record of a started dnsmasq.
pub fn record_path(paths: &DnsmasqPaths) -> PathBuf {
    paths.dir.join("dnsmasq.proc.json")
}

fn read_record(paths: &DnsmasqPaths) -> Option<ProcRecord> {
    serde_json::from_slice(&std::fs::read(record_path(paths)).ok()?).ok()
}

/// Records `pid` as the dnsmasq of `paths`, owned by this process.
fn write_record(paths: &DnsmasqPaths, process: ProcId) -> Result<()> {
    let Some(me) = ProcId::current() else {
        return Ok(());
    };
    let rec = ProcRecord {
        process,
        what: "dnsmasq".into(),
        owner: Owner {
            kind: "hvx-node-agent".into(),
            process: me,
        },
    };
    let text = serde_json::to_string(&rec).unwrap_or_default();
    write_file(&record_path(paths), &text)
}

/// The dnsmasq serving `paths`, if it is alive and really that dnsmasq: the pid file
/// names it, its command line names this config, and it is the very process recorded
/// (pid and start time; a stale pid file may name a recycled pid).
pub fn running(paths: &DnsmasqPaths) -> Option<ProcId> {
    let pid: u32 = std::fs::read_to_string(&paths.pid)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let id = ProcId::of(pid)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    let conf = paths.conf.to_string_lossy();
    if !(cmdline.contains("dnsmasq") && cmdline.contains(conf.as_ref())) {
        return None;
    }
    match read_record(paths) {
        Some(rec) if rec.process != id => None,
        _ => Some(id),
    }
}

/// The pid of [`running`].
pub fn running_pid(paths: &DnsmasqPaths) -> Option<u32> {
    running(paths).map(|p| p.pid)
}

/// Takes over a running dnsmasq left by a previous agent: the record names this
/// agent as owner from now on.
fn adopt(paths: &DnsmasqPaths, id: ProcId) -> Result<()> {
    match read_record(paths) {
        Some(rec) if Some(&rec.owner.process) == ProcId::current().as_ref() => Ok(()),
        Some(rec) => {
            tracing::info!(
                pid = id.pid,
                previous_owner = rec.owner.process.pid,
                "adopting dnsmasq"
            );
            write_record(paths, id)
        }
        None => write_record(paths, id),
    }
}

fn replace_if_changed(path: &Path, contents: &str) -> Result<bool> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(contents) {
        return Ok(false);
    }
    write_file(path, contents)?;
    Ok(true)
}

pub fn ensure(host: &Host, network: &str, cfg: &DnsmasqConfig) -> Result<DaemonAction> {
    let p = &cfg.paths;
    std::fs::create_dir_all(&p.dir).map_err(|source| OverlayError::WriteFile {
        path: p.dir.clone(),
        source,
    })?;
    let main_changed = replace_if_changed(&p.conf, &cfg.main)?;
    let hosts_changed = replace_if_changed(&p.hosts, &cfg.hosts)?;
    let dhcp_changed = replace_if_changed(&p.dhcp_hosts, &cfg.dhcp_hosts)?;
    match running(p) {
        None => {
            start(host, network, p)?;
            Ok(DaemonAction::Started)
        }
        Some(id) if main_changed => {
            stop_pid(id.pid)?;
            start(host, network, p)?;
            Ok(DaemonAction::Restarted)
        }
        Some(id) if hosts_changed || dhcp_changed => {
            adopt(p, id.clone())?;
            run(&["kill".into(), "-HUP".into(), id.pid.to_string()], None)?;
            Ok(DaemonAction::Reloaded)
        }
        Some(id) => {
            adopt(p, id)?;
            Ok(DaemonAction::Unchanged)
        }
    }
}

fn start(host: &Host, network: &str, p: &DnsmasqPaths) -> Result<()> {
    let _ = std::fs::remove_file(&p.pid);
    let _ = std::fs::remove_file(record_path(p));
    let conf = format!("--conf-file={}", p.conf.display());
    // dnsmasq daemonizes and exits non-zero with a message if it cannot bind.
    run(&host.exec_argv("dnsmasq", &[&conf]), None)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        // The pid file is written before the record: the new daemon is the pid
        // file's process, whatever record an old one left.
        if let Some(id) = running(p) {
            return write_record(p, id);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(OverlayError::DnsmasqStart {
        network: network.to_string(),
        pid_file: p.pid.clone(),
    })
}

fn stop_pid(pid: u32) -> Result<()> {
    let proc_dir = format!("/proc/{pid}");
    // Already gone is fine (cleanup treats "absent" as done).
    let _ = run(&["kill".into(), "-TERM".into(), pid.to_string()], None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !Path::new(&proc_dir).exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    run(&["kill".into(), "-KILL".into(), pid.to_string()], None).map(|_| ())
}

/// Stops the dnsmasq of a state directory if it runs.
pub fn stop(paths: &DnsmasqPaths) -> Result<()> {
    let stopped = match running(paths) {
        Some(id) => stop_pid(id.pid),
        None => Ok(()),
    };
    let _ = std::fs::remove_file(record_path(paths));
    stopped
}
