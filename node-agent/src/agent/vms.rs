//! The VMs on this node, as their launchers left them in their run dirs
//! (`vm.json`: identity and NICs; `status.json`: phase, QEMU pid, restarts), with
//! addresses from the networks' DHCP leases, and accounting
//! from /proc, QMP block stats and tap counters.

use super::error::AgentError;
use super::{Agent, network};
use crate::launcher::supervise::{VmIdentity, identity_path, status_path};
use hvx_api::launch::LauncherPhase;
use hvx_proto::v1 as pb;
use pb::vm_state::Phase;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the agent reads of a launcher's `status.json`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ReadStatus {
    /// Launcher phase.
    #[serde(default)]
    pub phase: LauncherPhase,
    /// Accelerator report.
    #[serde(default)]
    pub accel: Option<serde_json::Value>,
    /// Restarts so far.
    #[serde(default)]
    pub restarts: u32,
    /// Why QEMU last exited.
    #[serde(default)]
    pub last_exit: Option<String>,
    /// QEMU pid while running.
    #[serde(default)]
    pub qemu_pid: Option<u32>,
}

/// One VM found on the node.
#[derive(Clone, Debug)]
pub struct FoundVm {
    /// Its run dir.
    pub run_dir: PathBuf,
    /// Identity.
    pub id: VmIdentity,
    /// Launcher status.
    pub status: ReadStatus,
}

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

/// What identifies the QEMU of `run_dir` in a command line: its QMP socket's path
/// below the run root (`nodes/<node>/vms/<vm key>/qmp.sock`), the same in the
/// launcher pod (the `vm.hvx.dev` volume mirrors node paths below its root) as here.
fn qmp_suffix(run_dir: &Path) -> String {
    let parts: Vec<_> = run_dir
        .components()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let rel: PathBuf = parts.iter().collect();
    format!("/{}", rel.join("qmp.sock").display())
}

/// Whether a NUL-separated command line is QEMU's for the run dir `suffix` names.
/// Pure.
pub fn is_qemu_of(cmdline: &[u8], suffix: &str) -> bool {
    let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
    args.next().is_some_and(|bin| bin.contains("qemu-system")) && args.any(|a| a.contains(suffix))
}

/// The host pid of the QEMU of a run dir if it is alive. The launcher's
/// `status.json` has QEMU's pid in the launcher pod's PID namespace, which is the
/// agent's only when the pod shares the host's; so it is a hint, checked against the
/// process's command line (this VM's QMP socket), and otherwise /proc is searched.
pub fn live_qemu(run_dir: &Path) -> Option<u32> {
    let st: ReadStatus = read_json(&status_path(run_dir))?;
    let hint = st.qemu_pid?;
    let suffix = qmp_suffix(run_dir);
    let matches = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .is_some_and(|cmd| is_qemu_of(&cmd, &suffix))
    };
    if matches(hint) {
        return Some(hint);
    }
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| matches(*pid))
}

/// Every VM with a run dir here.
pub fn list(agent: &Agent) -> Vec<FoundVm> {
    let Ok(dir) = std::fs::read_dir(agent.paths.vms_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<FoundVm> = dir
        .flatten()
        .filter_map(|e| {
            let run_dir = e.path();
            let id: VmIdentity = read_json(&identity_path(&run_dir))?;
            let status = read_json(&status_path(&run_dir)).unwrap_or_default();
            Some(FoundVm {
                run_dir,
                id,
                status,
            })
        })
        .collect();
    out.sort_by(|a, b| a.id.vm_id.cmp(&b.id.vm_id));
    out
}

/// Checks a VM id from a request before it names paths (`vm_run_dir`, overlay refs).
pub fn check_vm_uid(uid: &str) -> Result<(), AgentError> {
    if uid.is_empty() || uid.contains("..") || uid.contains('\0') {
        return Err(AgentError::Invalid(format!("bad VM id {uid:?}")));
    }
    Ok(())
}

fn find(agent: &Agent, vm_uid: &str) -> Result<FoundVm, AgentError> {
    let run_dir = agent.paths.vm_run_dir(vm_uid);
    let id: VmIdentity = read_json(&identity_path(&run_dir))
        .ok_or_else(|| AgentError::Precondition(format!("no VM {vm_uid} on this node")))?;
    let status = read_json(&status_path(&run_dir)).unwrap_or_default();
    Ok(FoundVm {
        run_dir,
        id,
        status,
    })
}

/// The contract's view of a found VM.
pub fn state(agent: &Agent, vm: &FoundVm) -> pb::VmState {
    let alive = live_qemu(&vm.run_dir).is_some();
    let phase = match (vm.status.phase, alive) {
        (LauncherPhase::Running, true) => Phase::Running,
        (LauncherPhase::Running, false) => Phase::Crashed,
        (
            LauncherPhase::WaitingForNode | LauncherPhase::Starting | LauncherPhase::Restarting,
            _,
        ) => Phase::Starting,
        (LauncherPhase::Incoming, _) => Phase::Migrating,
        (LauncherPhase::Stopped, _) => Phase::Stopped,
        (LauncherPhase::Failed, _) => Phase::Crashed,
        (LauncherPhase::Unknown, _) => Phase::Unspecified,
    };
    let macs: Vec<&str> = vm.id.nics.iter().map(|n| n.mac.as_str()).collect();
    let addresses = network::persisted(agent)
        .iter()
        .flat_map(|n| network::leases(agent, n.vni))
        .filter(|l| macs.contains(&l.mac.as_str()))
        .collect();
    pb::VmState {
        vm_uid: vm.id.vm_id.clone(),
        name: vm.id.name.clone(),
        phase: phase as i32,
        accelerator: vm
            .status
            .accel
            .as_ref()
            .and_then(|a| a.get("accel")?.as_str().map(str::to_string))
            .unwrap_or_default(),
        reason: vm.status.last_exit.clone().unwrap_or_default(),
        restarts: vm.status.restarts,
        addresses,
        started_unix: 0,
    }
}

/// GetVm.
pub fn get(agent: &Agent, vm_uid: &str) -> Result<pb::VmState, AgentError> {
    find(agent, vm_uid).map(|vm| state(agent, &vm))
}

async fn qmp(run_dir: &Path) -> Result<hvx_vmm::qmp::QmpClient, AgentError> {
    let paths = hvx_vmm::RunPaths::new(run_dir);
    Ok(hvx_vmm::qmp::QmpClient::connect(&paths.qmp_probe, Duration::from_secs(3)).await?)
}

fn sys_counter(tap: &str, name: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// (cpu time ns, RSS bytes) of a process.
pub fn proc_usage(pid: u32) -> (u64, u64) {
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the `(comm)`, which may hold spaces.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            // USER_HZ is 100 on every Linux ABI hvx runs on.
            Some((utime + stime) * 10_000_000)
        })
        .unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
        * 1024;
    (cpu, rss)
}

/// GetVmMetrics.
pub async fn metrics(agent: &Agent, vm_uid: &str) -> Result<pb::VmMetrics, AgentError> {
    let vm = find(agent, vm_uid)?;
    let mut m = pb::VmMetrics {
        vm_uid: vm.id.vm_id.clone(),
        ..Default::default()
    };
    if let Some(pid) = live_qemu(&vm.run_dir) {
        (m.cpu_time_ns, m.memory_rss_bytes) = proc_usage(pid);
        if let Ok(q) = qmp(&vm.run_dir).await
            && let Ok(stats) = q.execute("query-blockstats", None).await
        {
            for dev in stats.as_array().into_iter().flatten() {
                let s = &dev["stats"];
                let n = |k: &str| s[k].as_u64().unwrap_or(0);
                m.disk_read_ops += n("rd_operations");
                m.disk_write_ops += n("wr_operations");
                m.disk_read_bytes += n("rd_bytes");
                m.disk_write_bytes += n("wr_bytes");
            }
        }
    }
    for nic in &vm.id.nics {
        // The tap's transmit is the guest's receive.
        m.net_rx_packets += sys_counter(&nic.tap, "tx_packets");
        m.net_tx_packets += sys_counter(&nic.tap, "rx_packets");
        m.net_rx_bytes += sys_counter(&nic.tap, "tx_bytes");
        m.net_tx_bytes += sys_counter(&nic.tap, "rx_bytes");
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_is_recognised_by_its_own_qmp_socket() {
        let run = Path::new("/run/hvx/nodes/n1/vms/vm-0123456789ab");
        let suffix = qmp_suffix(run);
        assert_eq!(suffix, "/nodes/n1/vms/vm-0123456789ab/qmp.sock");
        let cmd = |args: &[&str]| args.join("\0").into_bytes();
        let ours = cmd(&[
            "qemu-system-x86_64",
            "-qmp",
            "unix:/run/hvx/nodes/n1/vms/vm-0123456789ab/qmp.sock,server=on",
        ]);
        assert!(is_qemu_of(&ours, &suffix));
        // Mounted at another root in the pod: still ours.
        let elsewhere = cmd(&[
            "/usr/bin/qemu-system-x86_64",
            "-chardev",
            "socket,id=qmp,path=/pod/nodes/n1/vms/vm-0123456789ab/qmp.sock,server=on",
        ]);
        assert!(is_qemu_of(&elsewhere, &suffix));
        let other_vm = cmd(&[
            "qemu-system-x86_64",
            "-qmp",
            "unix:/run/hvx/nodes/n1/vms/vm-ffffffffffff/qmp.sock",
        ]);
        assert!(!is_qemu_of(&other_vm, &suffix));
        let not_qemu = cmd(&["sleep", "/run/hvx/nodes/n1/vms/vm-0123456789ab/qmp.sock"]);
        assert!(!is_qemu_of(&not_qemu, &suffix));
    }

    #[test]
    fn proc_usage_of_this_process() {
        let (cpu, rss) = proc_usage(std::process::id());
        assert!(rss > 0, "RSS read");
        let _ = cpu;
        assert_eq!(proc_usage(u32::MAX), (0, 0), "no such process");
    }
}
