//! Identity of a process that survives pid reuse: pid + start time (clock ticks since
//! boot, `/proc/<pid>/stat` field 22) + boot id. Never a name pattern.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// A process, as recorded on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks after boot.
    pub start_time: u64,
    /// `/proc/sys/kernel/random/boot_id` when it ran.
    pub boot_id: String,
}

/// The fields of `/proc/<pid>/stat` after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// This boot's id.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl ProcId {
    /// The process with this pid now, if there is one and it is not a zombie.
    pub fn of(pid: u32) -> Option<Self> {
        let f = stat_fields(pid)?;
        if f.first().map(String::as_str) == Some("Z") {
            return None;
        }
        Some(Self {
            pid,
            start_time: f.get(19)?.parse().ok()?,
            boot_id: boot_id(),
        })
    }

    /// This process.
    pub fn current() -> Option<Self> {
        Self::of(std::process::id())
    }

    /// Whether this very process (not a later one with the same pid) still runs.
    pub fn is_alive(&self) -> bool {
        Self::of(self.pid).is_some_and(|now| &now == self)
    }
}

/// The process group of `pid`.
pub fn pgid(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(2)?.parse().ok()
}

/// Live members of the process group `pgid`.
pub fn group_members(pgid: u32) -> Vec<ProcId> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| self::pgid(*p) == Some(pgid))
        .filter_map(ProcId::of)
        .collect()
}

/// Kills what is left of the process group `id` led when `id` itself is gone (its
/// grandchildren, say). Safe only because the kernel never gives a new process a
/// pid still used as a process group id: with no process of that pid in this boot,
/// a group of that id can only be the one `id` created.
pub fn kill_orphaned_group(id: &ProcId, timeout: Duration) -> usize {
    if id.boot_id != boot_id() || ProcId::of(id.pid).is_some() || id.pid <= 1 {
        return 0;
    }
    let members = group_members(id.pid);
    if members.is_empty() {
        return 0;
    }
    if let Ok(pgid) = i32::try_from(id.pid) {
        send_kill(-pgid);
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && members.iter().any(ProcId::is_alive) {
        std::thread::sleep(Duration::from_millis(10));
    }
    members.len()
}

#[allow(unsafe_code)]
fn send_kill(target: i32) -> bool {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(target, libc::SIGKILL) == 0 }
}

/// SIGKILLs `id` (its whole process group when it leads one, so its helpers go too)
/// and waits up to `timeout` for it to be gone. True once it is gone.
pub fn kill_and_wait(id: &ProcId, timeout: Duration) -> bool {
    if !id.is_alive() {
        return true;
    }
    let Ok(pid) = i32::try_from(id.pid) else {
        return false;
    };
    if pid <= 1 {
        return false;
    }
    if pgid(id.pid) == Some(id.pid) {
        send_kill(-pid);
    }
    send_kill(pid);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !id.is_alive() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    !id.is_alive()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kills_the_group_a_dead_leader_left() {
        // The leader exits at once; its background sleep stays in the group.
        let mut sh = std::process::Command::new("sh");
        std::os::unix::process::CommandExt::process_group(&mut sh, 0);
        let sh = sh
            .args(["-c", "sleep 60 >/dev/null 2>&1 & echo $!"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let leader = ProcId::of(sh.id()).expect("alive");
        let out = sh.wait_with_output().expect("wait");
        let pid: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("pid");
        let grandchild = ProcId::of(pid).expect("sleep runs");
        assert_eq!(pgid(pid), Some(leader.pid));
        // Another boot's record never kills anything.
        let other_boot = ProcId {
            boot_id: "0".into(),
            ..leader.clone()
        };
        assert_eq!(kill_orphaned_group(&other_boot, Duration::from_secs(1)), 0);
        assert!(grandchild.is_alive());
        assert_eq!(kill_orphaned_group(&leader, Duration::from_secs(5)), 1);
        assert!(!grandchild.is_alive(), "the group's member survived");
    }

    #[test]
    fn identity_of_this_process_and_of_nothing() {
        let me = ProcId::current().expect("self");
        assert!(me.is_alive());
        assert_eq!(me.boot_id.len(), 36, "{me:?}");
        let later = ProcId {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(!later.is_alive(), "a reused pid is another process");
        assert!(ProcId::of(u32::MAX).is_none());
    }

    #[test]
    fn kills_a_process_group_and_reports_it_gone() {
        let mut child = std::process::Command::new("sh");
        std::os::unix::process::CommandExt::process_group(&mut child, 0);
        let mut child = child
            .args(["-c", "sleep 60 & sleep 60"])
            .spawn()
            .expect("sh");
        let id = ProcId::of(child.id()).expect("alive");
        assert_eq!(pgid(child.id()), Some(child.id()));
        std::thread::sleep(Duration::from_millis(100));
        assert!(kill_and_wait(&id, Duration::from_secs(5)) || child.try_wait().is_ok());
        let _ = child.wait();
        assert!(!id.is_alive());
        // The background sleep was in the group: nothing of the group is left.
        let left = std::fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| pgid(*p) == Some(id.pid) && ProcId::of(*p).is_some())
            .count();
        assert_eq!(left, 0, "a member of the killed group survived");
    }
}
