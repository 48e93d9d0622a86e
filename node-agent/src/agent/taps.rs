//! VM taps in the node's network namespace. The agent creates them (persistent, so
//! they exist before QEMU starts and the switch can enslave them) and removes the
//! ones no network lists once no QEMU holds them (no carrier). Names come from
//! `hvx_api::launch::tap_name`: `hvt` + 12 hex digits.

use super::error::AgentError;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const SYS_NET: &str = "/sys/class/net";

/// Whether `name` is a tap name hvx made.
pub fn is_hvx_tap(name: &str) -> bool {
    name.len() == 15 && name.starts_with("hvt") && name[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn ip(args: &[&str]) -> Result<(), AgentError> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = hvx_child::output(cmd).map_err(AgentError::io("running ip"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(AgentError::Io {
            what: format!("ip {}", args.join(" ")),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        })
    }
}

/// Creates the tap if missing and brings it up.
pub fn ensure(name: &str) -> Result<(), AgentError> {
    if !is_hvx_tap(name) {
        return Err(AgentError::Invalid(format!(
            "{name:?} is not an hvx tap name"
        )));
    }
    if !Path::new(SYS_NET).join(name).exists() {
        // Single queue, as QEMU opens it (`-netdev tap,ifname=..`); QEMU sets
        // vnet_hdr on its own open.
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
    }
    ip(&["link", "set", "dev", name, "up"])
}

/// Whether a process (QEMU) has the tap open.
pub fn in_use(name: &str) -> bool {
    std::fs::read_to_string(Path::new(SYS_NET).join(name).join("carrier"))
        .map(|c| c.trim() == "1")
        .unwrap_or(false)
}

/// hvx taps present on the node.
pub fn present() -> BTreeSet<String> {
    std::fs::read_dir(SYS_NET)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| is_hvx_tap(n))
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes hvx taps not in `wanted`; in-use ones only when `force`.
pub fn remove_unwanted(wanted: &BTreeSet<String>, force: &BTreeSet<String>) -> Vec<String> {
    let mut removed = Vec::new();
    for t in present() {
        if wanted.contains(&t) || (in_use(&t) && !force.contains(&t)) {
            continue;
        }
        match ip(&["link", "del", "dev", &t]) {
            Ok(()) => removed.push(t),
            Err(e) => tracing::warn!(tap = %t, error = %e, "removing tap"),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hvx_tap_names_are_touched() {
        assert!(is_hvx_tap(&hvx_api::launch::tap_name("u/web", "ethernet0")));
        for other in [
            "eth0",
            "hvb4097",
            "hvt123",
            "hvtxyzxyzxyzxyz",
            "hvt0123456789abc",
        ] {
            assert!(!is_hvx_tap(other), "{other}");
        }
        assert!(ensure("eth0").is_err());
    }
}
