//! Pins: a gateway namespace outlives the agent's container.
//!
//! `ip netns add` names a namespace with a mount under `/run/netns` in the caller's
//! mount namespace. The agent runs in a container whose mount namespace dies with it,
//! and with it the name, the only thing keeping an idle namespace alive: a restarted
//! or upgraded agent would find each network's gateway, NAT state and firewall gone,
//! and every guest's routed or NATed connection with them. So each gateway namespace
//! also gets a pin: a second mount of it at `<state dir>/netns`, made in the mount
//! namespace of the host's pid 1 (the agent runs with hostPID), which no container's
//! end touches. A new agent's container sees the pin through its hostPath of the run
//! directory (volume bind mounts are recursive) and binds the name to it again.
//!
//! The source of the pin is the name as the host reaches it,
//! `/proc/<agent pid>/root/run/netns/<name>`: a mount of another mount namespace,
//! which the kernel lets one bind only because it is a namespace file.
//!
//! Where the host's pid 1 cannot be reached (no hostPID, no nsenter) pinning fails
//! soft: the namespace then lives as long as the agent's mount namespace, as before.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{OverlayError, Result};
use crate::host::{run, write_file};

/// Where a network's gateway namespace is pinned, in its state directory.
pub fn pin_path(state_dir: &Path) -> PathBuf {
    state_dir.join("netns")
}

/// `path` as process `host_pid` sees it (its root, its mounts); `path` itself for
/// this process's own mount namespace.
fn host_view(host_pid: Option<u32>, path: &Path) -> PathBuf {
    match host_pid {
        Some(pid) => {
            Path::new(&format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path))
        }
        None => path.to_path_buf(),
    }
}

/// `argv` run in the mount namespace of `host_pid` (this one for None).
fn in_host(host_pid: Option<u32>, argv: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    if let Some(pid) = host_pid {
        v.extend([
            "nsenter".into(),
            "-t".into(),
            pid.to_string(),
            "-m".into(),
            "--".into(),
        ]);
    }
    v.extend(argv.iter().map(|s| s.to_string()));
    v
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether pins can be made in the mount namespace of `host_pid` (two stats: cheap
/// enough for every apply, where a failing `nsenter` per apply would not be).
pub fn possible(host_pid: Option<u32>) -> bool {
    host_pid.is_none_or(|pid| std::fs::metadata(format!("/proc/{pid}/root/")).is_ok())
}

/// Whether the host's pin is the namespace named at `named`.
pub fn pinned(host_pid: Option<u32>, pin: &Path, named: &Path) -> bool {
    same_file(&host_view(host_pid, pin), named)
}

/// Pins the namespace named at `named` (absolute) at `pin` (absolute), replacing a
/// stale pin.
pub fn pin(host_pid: Option<u32>, pin: &Path, named: &Path) -> Result<()> {
    unpin(host_pid, pin);
    if let Some(dir) = pin.parent() {
        std::fs::create_dir_all(dir).map_err(|source| OverlayError::WriteFile {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    if !pin.exists() {
        write_file(pin, "")?;
    }
    let source = match host_pid {
        Some(_) => format!("/proc/{}/root{}", std::process::id(), named.display()),
        None => named.display().to_string(),
    };
    let target = pin.display().to_string();
    run(
        &in_host(host_pid, &["mount", "--bind", &source, &target]),
        None,
    )?;
    Ok(())
}

/// Removes the pin (in the host's mount namespace and in this one, where a new
/// container has a copy of it); absent is fine.
pub fn unpin(host_pid: Option<u32>, pin: &Path) {
    let target = pin.display().to_string();
    // A pin made twice (two agents racing after a restart) is two mounts: take all.
    for _ in 0..8 {
        let host = host_view(host_pid, pin);
        let mounted = match (
            std::fs::metadata(&host),
            host.parent().map(std::fs::metadata),
        ) {
            (Ok(f), Some(Ok(d))) => f.dev() != d.dev(),
            _ => false,
        };
        if !mounted {
            break;
        }
        if run(&in_host(host_pid, &["umount", "-l", &target]), None).is_err() {
            break;
        }
    }
    while crate::apply::is_netns_mount(pin) {
        if run(
            &["umount".into(), "-l".into(), pin.display().to_string()],
            None,
        )
        .is_err()
        {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_sees_a_pin_through_pid_1s_root() {
        let pin = Path::new("/run/hvx/nodes/n1/overlay/4242/netns");
        assert_eq!(
            host_view(Some(1), pin),
            Path::new("/proc/1/root/run/hvx/nodes/n1/overlay/4242/netns")
        );
        assert_eq!(host_view(None, pin), pin);
        assert_eq!(
            in_host(Some(1), &["umount", "-l", "/x"]),
            ["nsenter", "-t", "1", "-m", "--", "umount", "-l", "/x"]
        );
        assert_eq!(in_host(None, &["umount", "/x"]), ["umount", "/x"]);
        assert_eq!(
            pin_path(Path::new("/run/hvx/overlay/4242")),
            Path::new("/run/hvx/overlay/4242/netns")
        );
    }
}
