//! Lifecycle of the per-network dnsmasq: files in the network's state directory,
//! the daemon found again after an agent restart. It is the one process hvx starts
//! that is meant to outlive its starter (it daemonizes, so DHCP and DNS keep working
//! while the agent process is down): it is recorded in `dnsmasq.proc.json` (pid,
//! start time, owner) and the next agent adopts it only if pid *and* start time still
//! match, else starts a new one; networks no longer wanted are torn down with their
//! dnsmasq. In a pod, containerd kills it with the agent container (see
//! docs/architecture.md, "Process lifetimes").

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvx_child::{Owner, ProcId, ProcRecord};

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

/// The process the pid file names, if it is alive and a dnsmasq of this config (a
/// stale pid file may name a recycled pid).
fn pid_file_process(paths: &DnsmasqPaths) -> Option<ProcId> {
    let pid: u32 = std::fs::read_to_string(&paths.pid)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let id = ProcId::of(pid)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    let conf = paths.conf.to_string_lossy();
    (cmdline.contains("dnsmasq") && cmdline.contains(conf.as_ref())).then_some(id)
}

/// The dnsmasq serving `paths` that hvx can adopt: the pid file's dnsmasq of this
/// config, and the very process recorded (pid and start time) unless there is no
/// record yet (started by an agent that did not write one).
pub fn running(paths: &DnsmasqPaths) -> Option<ProcId> {
    let id = pid_file_process(paths)?;
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

/// Largest `dnsmasq.log` kept in the state directory (tmpfs) before it is rotated to
/// `dnsmasq.log.1`; dnsmasq logs every DHCP transaction.
pub const DNSMASQ_LOG_MAX_BYTES: u64 = 4 << 20;

/// Rotates the dnsmasq log of `paths` when it outgrew [`DNSMASQ_LOG_MAX_BYTES`]
/// (the agent calls this on every apply and periodically).
pub fn cap_log(paths: &DnsmasqPaths) {
    match hvx_child::cap_log(&paths.log, DNSMASQ_LOG_MAX_BYTES) {
        Ok(true) => tracing::info!(log = %paths.log.display(), "dnsmasq log rotated"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(log = %paths.log.display(), error = %e, "rotating the dnsmasq log")
        }
    }
}

pub fn ensure(host: &Host, network: &str, cfg: &DnsmasqConfig) -> Result<DaemonAction> {
    let p = &cfg.paths;
    std::fs::create_dir_all(&p.dir).map_err(|source| OverlayError::WriteFile {
        path: p.dir.clone(),
        source,
    })?;
    cap_log(p);
    let main_changed = replace_if_changed(&p.conf, &cfg.main)?;
    let hosts_changed = replace_if_changed(&p.hosts, &cfg.hosts)?;
    let dhcp_changed = replace_if_changed(&p.dhcp_hosts, &cfg.dhcp_hosts)?;
    // A dnsmasq of this config that is not the recorded one is reaped, not adopted
    // (it would also hold the ports a new one needs).
    if let Some(stray) = pid_file_process(p).filter(|id| running(p).as_ref() != Some(id)) {
        tracing::warn!(
            network,
            pid = stray.pid,
            "stopping a dnsmasq that is not the recorded one"
        );
        stop_pid(&stray)?;
    }
    // A dnsmasq serving another namespace than the network's (the namespace was
    // made afresh while an old dnsmasq lived on elsewhere) serves no guest here.
    if let Some(id) = running(p).filter(|id| !serves_netns_of(id, host)) {
        tracing::warn!(
            network,
            pid = id.pid,
            "stopping a dnsmasq that serves another network namespace"
        );
        stop_pid(&id)?;
    }
    match running(p) {
        None => {
            start(host, network, p)?;
            Ok(DaemonAction::Started)
        }
        Some(id) if main_changed => {
            stop_pid(&id)?;
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

/// Whether process `id` lives in `host`'s network namespace (always true for the
/// node's own namespace, which hvx never replaces).
fn serves_netns_of(id: &ProcId, host: &Host) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(ns) = &host.netns else {
        return true;
    };
    match (
        std::fs::metadata(format!("/proc/{}/ns/net", id.pid)),
        std::fs::metadata(Path::new("/run/netns").join(ns)),
    ) {
        (Ok(proc_ns), Ok(named)) => proc_ns.ino() == named.ino() && proc_ns.dev() == named.dev(),
        // Gone meanwhile, or no name: nothing to compare; keep what runs.
        _ => true,
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

/// SIGTERM, then SIGKILL after 5 s; by pid and start time, so a pid recycled
/// meanwhile is never signalled.
fn stop_pid(id: &ProcId) -> Result<()> {
    if !id.is_alive() {
        // Already gone is fine (cleanup treats "absent" as done).
        return Ok(());
    }
    let _ = run(&["kill".into(), "-TERM".into(), id.pid.to_string()], None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !id.is_alive() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if hvx_child::kill_and_wait(id, Duration::from_secs(5)) {
        Ok(())
    } else {
        Err(OverlayError::CommandFailed {
            command: format!("kill -KILL {}", id.pid),
            status: "still running".into(),
            stderr: "dnsmasq did not die".into(),
        })
    }
}

/// Stops the dnsmasq of a state directory if it runs.
pub fn stop(paths: &DnsmasqPaths) -> Result<()> {
    // Whatever dnsmasq serves this config, recorded or not.
    let stopped = match pid_file_process(paths) {
        Some(id) => stop_pid(&id),
        None => Ok(()),
    };
    let _ = std::fs::remove_file(record_path(paths));
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process whose command line reads like the dnsmasq of `paths`.
    fn fake_dnsmasq(paths: &DnsmasqPaths) -> std::process::Child {
        let mut c = std::process::Command::new("bash");
        c.args([
            "-c",
            &format!(
                "exec -a 'dnsmasq --conf-file={}' sleep 60",
                paths.conf.display()
            ),
        ]);
        let child = hvx_child::spawn(c).expect("bash");
        std::fs::write(&paths.pid, child.id().to_string()).expect("pid file");
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_file_process(paths).is_none() {
            assert!(Instant::now() < deadline, "fake dnsmasq did not exec");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    #[test]
    fn adopts_the_recorded_dnsmasq_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let paths = DnsmasqPaths::new(dir.path());
        let mut child = fake_dnsmasq(&paths);
        let id = ProcId::of(child.id()).expect("alive");
        // No record yet (an older agent): adoptable, and adopting records it.
        assert_eq!(running(&paths), Some(id.clone()));
        adopt(&paths, id.clone()).expect("adopt");
        let rec = read_record(&paths).expect("record");
        assert_eq!(rec.process, id);
        assert_eq!(rec.owner.process, ProcId::current().expect("self"));
        // A record naming another start time: the pid file's process is not ours.
        let other = ProcRecord {
            process: ProcId {
                start_time: id.start_time + 1,
                ..id.clone()
            },
            ..rec
        };
        write_file(
            &record_path(&paths),
            &serde_json::to_string(&other).expect("json"),
        )
        .expect("write");
        assert_eq!(running(&paths), None);
        // A pid file naming some other program: nothing runs.
        std::fs::write(&paths.pid, std::process::id().to_string()).expect("pid");
        assert_eq!(pid_file_process(&paths), None);
        std::fs::write(&paths.pid, child.id().to_string()).expect("pid");
        // stop() ends whatever dnsmasq serves the config, recorded or not.
        stop(&paths).expect("stop");
        let _ = child.wait();
        assert!(!id.is_alive());
        assert!(!record_path(&paths).exists());
    }
}
