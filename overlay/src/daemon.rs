//! Lifecycle of the per-network dnsmasq: files in the network's state directory,
//! the daemon found again through its pid file after an agent restart (it is not a
//! child of the agent, so DHCP and DNS keep working while the agent is down).

use std::path::Path;
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

/// The pid of the dnsmasq serving `paths`, if it is alive and really that dnsmasq
/// (a stale pid file may name a recycled pid).
pub fn running_pid(paths: &DnsmasqPaths) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(&paths.pid)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    let conf = paths.conf.to_string_lossy();
    (cmdline.contains("dnsmasq") && cmdline.contains(conf.as_ref())).then_some(pid)
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
    match running_pid(p) {
        None => {
            start(host, network, p)?;
            Ok(DaemonAction::Started)
        }
        Some(pid) if main_changed => {
            stop_pid(pid)?;
            start(host, network, p)?;
            Ok(DaemonAction::Restarted)
        }
        Some(pid) if hosts_changed || dhcp_changed => {
            run(&["kill".into(), "-HUP".into(), pid.to_string()], None)?;
            Ok(DaemonAction::Reloaded)
        }
        Some(_) => Ok(DaemonAction::Unchanged),
    }
}

fn start(host: &Host, network: &str, p: &DnsmasqPaths) -> Result<()> {
    let _ = std::fs::remove_file(&p.pid);
    let conf = format!("--conf-file={}", p.conf.display());
    // dnsmasq daemonizes and exits non-zero with a message if it cannot bind.
    run(&host.exec_argv("dnsmasq", &[&conf]), None)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if running_pid(p).is_some() {
            return Ok(());
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
    match running_pid(paths) {
        Some(pid) => stop_pid(pid),
        None => Ok(()),
    }
}
