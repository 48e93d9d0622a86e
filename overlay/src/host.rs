//! Running iproute2 / nftables / dnsmasq on a node, optionally inside a network
//! namespace (tests make several "nodes" on one machine that way).
//!
//! Why the command-line tools rather than rtnetlink: `ip`, `bridge` and `nft` have
//! stable JSON output (`-j`) and batch input, need no unsafe code or netlink
//! plumbing in this crate, support `-n <netns>` directly, and are exactly what an
//! operator types when debugging a node, so logs show reproducible commands.
//! A whole FDB change is one `bridge -batch` process, which keeps MAC-move
//! reprogramming in the low milliseconds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{OverlayError, Result};
use crate::names;

/// Where commands run: the current namespace (production: the agent runs with
/// hostNetwork) or a named network namespace.
#[derive(Debug, Clone)]
pub struct Host {
    pub netns: Option<String>,
    /// Root of the per-network state directories (dnsmasq files).
    pub state_root: PathBuf,
    /// Names of this node's per-network gateway namespaces start with this
    /// ([`names::GATEWAY_NETNS_PREFIX`] on a real node; a test "node" that is itself
    /// a namespace gets its own, so several share one machine's `/run/netns`).
    pub gateway_netns_prefix: String,
    /// The process whose mount namespace holds gateway namespace pins ([`crate::pin`]):
    /// the host's pid 1 on a node (the agent's own mount namespace ends with its
    /// container); None for this process's own (tests and lab nodes, which run in the
    /// host's already).
    pub pin_host_pid: Option<u32>,
}

impl Host {
    pub fn new(state_root: impl Into<PathBuf>) -> Self {
        Host {
            netns: None,
            state_root: state_root.into(),
            gateway_netns_prefix: names::GATEWAY_NETNS_PREFIX.to_string(),
            pin_host_pid: Some(1),
        }
    }

    pub fn in_netns(netns: impl Into<String>, state_root: impl Into<PathBuf>) -> Self {
        let netns = netns.into();
        Host {
            gateway_netns_prefix: format!("{netns}-g"),
            netns: Some(netns),
            state_root: state_root.into(),
            pin_host_pid: None,
        }
    }

    /// The gateway namespace of network `vni` on this node.
    pub fn gateway_netns(&self, vni: u32) -> String {
        names::gateway_netns(&self.gateway_netns_prefix, vni)
    }

    /// Commands run inside network `vni`'s gateway namespace.
    pub fn gateway_host(&self, vni: u32) -> Host {
        Host::in_netns(self.gateway_netns(vni), self.state_root.clone())
    }

    /// `ip [-n ns] args...`
    pub fn ip_argv(&self, args: &[&str]) -> Vec<String> {
        self.iproute("ip", args)
    }

    /// `bridge [-n ns] args...`
    pub fn bridge_argv(&self, args: &[&str]) -> Vec<String> {
        self.iproute("bridge", args)
    }

    fn iproute(&self, tool: &str, args: &[&str]) -> Vec<String> {
        let mut v = vec![tool.to_string()];
        if let Some(ns) = &self.netns {
            v.push("-n".into());
            v.push(ns.clone());
        }
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    /// Any other program, inside the namespace when there is one. `nsenter --net`
    /// rather than `ip netns exec`: it skips the sysfs remount, a few ms per call.
    pub fn exec_argv(&self, program: &str, args: &[&str]) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(ns) = &self.netns {
            v.push("nsenter".to_string());
            v.push(format!("--net=/run/netns/{ns}"));
            v.push("--".to_string());
        }
        v.push(program.to_string());
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    pub fn state_dir(&self, vni: u32) -> PathBuf {
        self.state_root.join(vni.to_string())
    }
}

/// Runs argv, feeding `stdin` if given; returns stdout or a `CommandFailed` with stderr.
pub fn run(argv: &[String], stdin: Option<&str>) -> Result<String> {
    let (program, args) = argv.split_first().ok_or_else(|| OverlayError::Spawn {
        program: String::new(),
        source: std::io::Error::other("empty command"),
    })?;
    tracing::debug!(command = %argv.join(" "), "run");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Dies with the agent like every child hvx starts (hvx-child).
    let mut child = hvx_child::spawn(cmd).map_err(|source| OverlayError::Spawn {
        program: program.clone(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| OverlayError::Spawn {
                program: program.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| OverlayError::Spawn {
            program: program.clone(),
            source,
        })?;
    if !out.status.success() {
        let mut command = argv.join(" ");
        if let Some(input) = stdin {
            command.push_str(" <<< ");
            command.push_str(&input.chars().take(400).collect::<String>());
        }
        return Err(OverlayError::CommandFailed {
            command,
            status: out.status.code().map_or("signal".into(), |c| c.to_string()),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs argv and parses its stdout as JSON (empty output = empty array, which is
/// what iproute2 prints for "nothing").
pub fn run_json<T: serde::de::DeserializeOwned + Default>(argv: &[String]) -> Result<T> {
    let out = run(argv, None)?;
    if out.trim().is_empty() {
        return Ok(T::default());
    }
    serde_json::from_str(&out).map_err(|source| OverlayError::ParseOutput {
        command: argv.join(" "),
        source,
    })
}

pub fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|source| OverlayError::WriteFile {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_prefixes_the_namespace() {
        let h = Host::in_netns("n1", "/tmp/s");
        assert_eq!(h.ip_argv(&["link"]), ["ip", "-n", "n1", "link"]);
        assert_eq!(
            h.exec_argv("nft", &["-f", "-"]),
            ["nsenter", "--net=/run/netns/n1", "--", "nft", "-f", "-"]
        );
        let root = Host::new("/run/hvx");
        assert_eq!(root.bridge_argv(&["fdb"]), ["bridge", "fdb"]);
        assert_eq!(root.state_dir(7), Path::new("/run/hvx/7"));
        assert_eq!(root.gateway_netns(7), "hvx-n-7");
        assert_eq!(h.gateway_netns(7), "n1-g7", "test nodes do not share names");
        assert_eq!(
            root.gateway_host(7).ip_argv(&["link"]),
            ["ip", "-n", "hvx-n-7", "link"]
        );
    }

    #[test]
    fn failures_carry_stderr() {
        let err = run(
            &["sh".into(), "-c".into(), "echo boom >&2; exit 3".into()],
            None,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("boom") && msg.contains("exit 3"), "{msg}");
        assert!(run(&["/nonexistent/tool".into()], None).is_err());
    }
}
