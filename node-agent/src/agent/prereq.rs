//! Node prerequisite checks, on start and every `interval`: kernel modules bridge and
//! vxlan, tun by its function (`/dev/net/tun` openable: a built-in tun need not show
//! in `/sys/module`, and a node may have no module tree), nftables usable, the QEMU binaries runnable,
//! KVM (informational: without it VMs run under TCG), free space in the disk store,
//! and the underlay MTU against the overlay's VXLAN overhead.
//!
//! Probing ([`observe`]) gathers raw facts from configurable paths; [`evaluate`]
//! (pure) turns them into a [`Report`]. The agent publishes it on its own Node
//! ([`publish`]): condition `HvxReady`, annotation `hvx.dev/prerequisites`, and a
//! Warning event when the set of failed checks changes to non-empty.
//!
//! The settings come from a JSON file (the chart's `hvx-agent-prerequisites`
//! ConfigMap): defaults plus per-node overrides, re-read at every check so a changed
//! ConfigMap applies without restarting the agent.

use hvx_api::prereq::{self, Check, Outcome, Report};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// VXLAN over IPv4 adds 50 bytes: a 1500-byte guest frame needs this underlay MTU.
pub const OVERLAY_UNDERLAY_MTU: u32 = 1550;
/// Kernel modules the overlay needs (loaded, built in, or loadable). tun is checked
/// by opening its device instead.
pub const MODULES: [&str; 2] = ["bridge", "vxlan"];

/// Settings of the checks; every field optional in the file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Settings {
    /// The store fails its check below this many free bytes.
    pub min_free_bytes: u64,
    /// The QEMU system emulator run by launchers.
    pub qemu_system: PathBuf,
    /// qemu-img, which imports and converts disks.
    pub qemu_img: PathBuf,
    /// nft, which programs network firewalls and NAT.
    pub nft: PathBuf,
    /// The tun device taps are made with.
    pub tun_device: PathBuf,
    /// The KVM device.
    pub kvm_device: PathBuf,
    /// Where loaded and built-in modules show (`/sys/module`).
    pub sys_module: PathBuf,
    /// The module tree (`/lib/modules`): loadable modules are listed in
    /// `<release>/modules.dep` and `modules.builtin`.
    pub lib_modules: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            min_free_bytes: 10 << 30,
            qemu_system: hvx_vmm::argv::QEMU_BINARY.into(),
            qemu_img: "qemu-img".into(),
            nft: "nft".into(),
            tun_device: "/dev/net/tun".into(),
            kvm_device: "/dev/kvm".into(),
            sys_module: "/sys/module".into(),
            lib_modules: "/lib/modules".into(),
        }
    }
}

/// Per-node overrides: any field of [`Settings`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Override {
    min_free_bytes: Option<u64>,
    qemu_system: Option<PathBuf>,
    qemu_img: Option<PathBuf>,
    nft: Option<PathBuf>,
    tun_device: Option<PathBuf>,
    kvm_device: Option<PathBuf>,
}

/// The settings file: defaults and per-node overrides by node name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct SettingsFile {
    /// Settings for every node.
    pub defaults: Option<Override>,
    /// Overrides by node name.
    pub nodes: BTreeMap<String, Override>,
}

impl SettingsFile {
    /// Parses the file's JSON.
    pub fn parse(json: &str) -> Result<Self, String> {
        serde_json::from_str(json).map_err(|e| format!("prerequisite settings: {e}"))
    }

    /// The settings of `node`: built-in defaults, then `defaults`, then its override.
    pub fn for_node(&self, node: &str) -> Settings {
        let mut s = Settings::default();
        for o in self.defaults.iter().chain(self.nodes.get(node)) {
            if let Some(v) = o.min_free_bytes {
                s.min_free_bytes = v;
            }
            for (field, value) in [
                (&mut s.qemu_system, &o.qemu_system),
                (&mut s.qemu_img, &o.qemu_img),
                (&mut s.nft, &o.nft),
                (&mut s.tun_device, &o.tun_device),
                (&mut s.kvm_device, &o.kvm_device),
            ] {
                if let Some(v) = value {
                    *field = v.clone();
                }
            }
        }
        s
    }
}

/// Where a kernel module stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleState {
    /// In `/sys/module`: loaded or built in.
    Present,
    /// Not loaded, but the module tree has it (loaded on first use).
    Loadable,
    /// Neither.
    Missing,
}

/// Raw facts of one probe run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observations {
    /// Each of [`MODULES`].
    pub modules: Vec<(String, ModuleState)>,
    /// Opening the tun device read-write.
    pub tun: Result<(), String>,
    /// `nft list tables`.
    pub nft: Result<(), String>,
    /// `qemu-system-x86_64 --version`: its first line.
    pub qemu_system: Result<String, String>,
    /// `qemu-img --version`: its first line.
    pub qemu_img: Result<String, String>,
    /// Opening the KVM device read-write.
    pub kvm: Result<(), String>,
    /// Free bytes in the disk store; `None` when unknown.
    pub store_free_bytes: Option<u64>,
    /// The underlay MTU.
    pub underlay_mtu: u32,
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn check(name: &str, result: Outcome, message: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        result,
        message: message.into(),
    }
}

/// The checks, in a fixed order, from what was observed.
pub fn evaluate(obs: &Observations, settings: &Settings) -> Report {
    let mut checks = Vec::new();
    for (module, state) in &obs.modules {
        checks.push(match state {
            ModuleState::Present => check(&format!("module-{module}"), Outcome::Ok, "loaded"),
            ModuleState::Loadable => check(
                &format!("module-{module}"),
                Outcome::Ok,
                "not loaded, loadable",
            ),
            ModuleState::Missing => check(
                &format!("module-{module}"),
                Outcome::Fail,
                "neither loaded nor in the module tree",
            ),
        });
    }
    let required = |name: &str, r: &Result<String, String>| match r {
        Ok(what) => check(name, Outcome::Ok, what.clone()),
        Err(why) => check(name, Outcome::Fail, why.clone()),
    };
    let unit = |r: &Result<(), String>| r.clone().map(|()| "usable".to_string());
    checks.push(required("tun", &unit(&obs.tun)));
    checks.push(required("nftables", &unit(&obs.nft)));
    checks.push(required("qemu-system", &obs.qemu_system));
    checks.push(required("qemu-img", &obs.qemu_img));
    checks.push(match &obs.kvm {
        Ok(()) => check("kvm", Outcome::Ok, "usable"),
        Err(why) => check(
            "kvm",
            Outcome::Warn,
            format!("{why}: VMs run under TCG (slower)"),
        ),
    });
    checks.push(match obs.store_free_bytes {
        Some(free) if free >= settings.min_free_bytes => {
            check("store-space", Outcome::Ok, format!("{} free", gib(free)))
        }
        Some(free) => check(
            "store-space",
            Outcome::Fail,
            format!(
                "{} free, below the minimum of {}",
                gib(free),
                gib(settings.min_free_bytes)
            ),
        ),
        None => check(
            "store-space",
            Outcome::Warn,
            "free space of the disk store unknown",
        ),
    });
    checks.push(if obs.underlay_mtu >= OVERLAY_UNDERLAY_MTU {
        check(
            "underlay-mtu",
            Outcome::Ok,
            format!("{}: guests keep MTU 1500", obs.underlay_mtu),
        )
    } else {
        check(
            "underlay-mtu",
            Outcome::Warn,
            format!(
                "{} < {OVERLAY_UNDERLAY_MTU}: guest MTU is reduced to {}",
                obs.underlay_mtu,
                obs.underlay_mtu.saturating_sub(50)
            ),
        )
    });
    Report { checks }
}

/// Where `module` stands, from `/sys/module` and the module tree of `release`.
pub fn module_state(
    sys_module: &Path,
    lib_modules: &Path,
    release: &str,
    module: &str,
) -> ModuleState {
    if sys_module.join(module).exists() {
        return ModuleState::Present;
    }
    let file = format!("/{module}.ko");
    let listed = |name: &str| {
        std::fs::read_to_string(lib_modules.join(release).join(name))
            .map(|text| {
                text.lines().any(|l| {
                    let path = l.split(':').next().unwrap_or_default();
                    path.ends_with(&file) || path.contains(&format!("{file}."))
                })
            })
            .unwrap_or(false)
    };
    if listed("modules.dep") || listed("modules.builtin") {
        ModuleState::Loadable
    } else {
        ModuleState::Missing
    }
}

fn open_rw(path: &Path) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

/// Runs `program args`; its first output line, or why it did not work.
fn run_first_line(program: &Path, args: &[&str]) -> Result<String, String> {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    match hvx_child::output(cmd) {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("runs")
            .trim()
            .to_string()),
        Ok(out) => Err(format!(
            "{} {} failed ({}): {}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {}: {e}", program.display())),
    }
}

/// The kernel release (`uname -r`) from procfs.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Probes this node (blocking: runs nft and QEMU).
pub fn observe(
    settings: &Settings,
    store_free_bytes: Option<u64>,
    underlay_mtu: u32,
) -> Observations {
    let release = kernel_release();
    Observations {
        modules: MODULES
            .iter()
            .map(|m| {
                (
                    m.to_string(),
                    module_state(&settings.sys_module, &settings.lib_modules, &release, m),
                )
            })
            .collect(),
        tun: open_rw(&settings.tun_device),
        nft: run_first_line(&settings.nft, &["list", "tables"]).map(drop),
        qemu_system: run_first_line(&settings.qemu_system, &["--version"]),
        qemu_img: run_first_line(&settings.qemu_img, &["--version"]),
        kvm: open_rw(&settings.kvm_device),
        store_free_bytes,
        underlay_mtu,
    }
}

/// The condition and annotation patches of a report.
pub fn node_patches(
    report: &Report,
    now: k8s_openapi::jiff::Timestamp,
    transitioned: bool,
) -> (serde_json::Value, serde_json::Value) {
    let ok = report.failed().next().is_none();
    let mut condition = serde_json::json!({
        "type": prereq::CONDITION,
        "status": if ok { "True" } else { "False" },
        "reason": if ok { prereq::REASON_OK } else { prereq::REASON_FAILED },
        "message": report.summary(),
        "lastHeartbeatTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
    });
    if transitioned {
        condition["lastTransitionTime"] = condition["lastHeartbeatTime"].clone();
    }
    let status = serde_json::json!({"status": {"conditions": [condition]}});
    let annotation = serde_json::json!({"metadata": {"annotations": {
        prereq::ANNOTATION: serde_json::to_string(report).unwrap_or_default(),
    }}});
    (status, annotation)
}

/// Where events about Nodes go: the API server accepts an event about a
/// cluster-scoped object only in `default` (where the kubelet's node events are too).
pub const EVENT_NAMESPACE: &str = "default";

/// The Warning event of a report with failed checks (core/v1, about the Node:
/// `kubectl describe node` lists it).
pub fn warning_event(
    report: &Report,
    node: &str,
    now: k8s_openapi::jiff::Timestamp,
) -> Option<serde_json::Value> {
    report.failed().next()?;
    let time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now);
    Some(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": format!("{node}.hvx-prerequisites."), "namespace": EVENT_NAMESPACE},
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node},
        "type": "Warning",
        "reason": prereq::REASON_FAILED,
        "message": report.summary(),
        "source": {"component": "hvx-agent", "host": node},
        "firstTimestamp": time,
        "lastTimestamp": time,
        "count": 1,
    }))
}

/// Publishes a report on `node`: condition (status subresource, strategic merge by
/// condition type, so the kubelet's conditions stay), annotation, and the event when
/// `event` is set.
pub async fn publish(
    node: &str,
    report: &Report,
    transitioned: bool,
    event: bool,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::core::v1::{Event, Node};
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let client = kube::Client::try_default().await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let now = k8s_openapi::jiff::Timestamp::now();
    let (status, annotation) = node_patches(report, now, transitioned);
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Strategic(&status))
        .await?;
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&annotation))
        .await?;
    if event && let Some(e) = warning_event(report, node, now) {
        let e: Event = serde_json::from_value(e).map_err(kube::Error::SerdeError)?;
        Api::<Event>::namespaced(client, EVENT_NAMESPACE)
            .create(&PostParams::default(), &e)
            .await?;
    }
    Ok(())
}

/// Reads the settings file; missing or unreadable: built-in defaults (logged).
pub fn load_settings(file: Option<&Path>, node: &str) -> Settings {
    let Some(file) = file else {
        return Settings::default();
    };
    match std::fs::read_to_string(file)
        .map_err(|e| format!("reading {}: {e}", file.display()))
        .and_then(|t| SettingsFile::parse(&t))
    {
        Ok(f) => f.for_node(node),
        Err(why) => {
            tracing::warn!(%why, "prerequisite settings: using the defaults");
            Settings::default()
        }
    }
}

/// Checks this node now and then every `interval`, publishing each report on the
/// Node when `publish_on_node` (retried at the next round when the API fails).
pub async fn run_forever(
    agent: std::sync::Arc<super::Agent>,
    settings_file: Option<PathBuf>,
    interval: std::time::Duration,
    publish_on_node: bool,
) {
    let node = agent.config.node_name.clone();
    // What the Node holds: whether it passed, and which checks failed.
    let mut published: Option<(bool, Vec<String>)> = None;
    loop {
        let settings = load_settings(settings_file.as_deref(), &node);
        let free = agent.store.filesystem_available().await.ok();
        let mtu = agent.config.underlay_mtu;
        let probe_settings = settings.clone();
        let observed =
            tokio::task::spawn_blocking(move || observe(&probe_settings, free, mtu)).await;
        match observed {
            Ok(obs) => {
                let report = evaluate(&obs, &settings);
                let failed: Vec<String> = report.failed().map(|c| c.name.clone()).collect();
                let ok = failed.is_empty();
                let changed = published.as_ref().is_none_or(|(_, f)| *f != failed);
                if changed {
                    if ok {
                        tracing::info!(summary = %report.summary(), "node prerequisites");
                    } else {
                        tracing::warn!(summary = %report.summary(), "node prerequisites missing");
                    }
                }
                *agent.prereq.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
                if publish_on_node {
                    let transitioned = published.as_ref().is_none_or(|(was, _)| *was != ok);
                    match publish(&node, &report, transitioned, changed && !ok).await {
                        Ok(()) => published = Some((ok, failed)),
                        Err(e) => {
                            tracing::warn!(error = %e, "publishing the prerequisite report on the node")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "prerequisite probe"),
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Observations {
        Observations {
            modules: MODULES
                .iter()
                .map(|m| (m.to_string(), ModuleState::Present))
                .collect(),
            tun: Ok(()),
            nft: Ok(()),
            qemu_system: Ok("QEMU emulator version 9.2".into()),
            qemu_img: Ok("qemu-img version 9.2".into()),
            kvm: Ok(()),
            store_free_bytes: Some(100 << 30),
            underlay_mtu: 1550,
        }
    }

    fn outcome(r: &Report, name: &str) -> Option<Outcome> {
        r.checks.iter().find(|c| c.name == name).map(|c| c.result)
    }

    #[test]
    fn a_good_node_passes_every_check() {
        let r = evaluate(&good(), &Settings::default());
        assert_eq!(r.checks.len(), 9);
        assert!(r.checks.iter().all(|c| c.result == Outcome::Ok), "{r:?}");
    }

    #[test]
    fn missing_pieces_fail_and_soft_ones_warn() {
        let mut o = good();
        o.modules[1].1 = ModuleState::Missing;
        o.modules[0].1 = ModuleState::Loadable;
        o.qemu_img = Err("cannot run /nope/qemu-img: not found".into());
        o.kvm = Err("cannot open /dev/kvm".into());
        o.underlay_mtu = 1500;
        o.store_free_bytes = Some(1 << 30);
        let r = evaluate(&o, &Settings::default());
        assert_eq!(outcome(&r, "module-bridge"), Some(Outcome::Ok));
        assert_eq!(outcome(&r, "module-vxlan"), Some(Outcome::Fail));
        assert_eq!(outcome(&r, "qemu-img"), Some(Outcome::Fail));
        assert_eq!(outcome(&r, "kvm"), Some(Outcome::Warn));
        assert_eq!(outcome(&r, "underlay-mtu"), Some(Outcome::Warn));
        assert_eq!(outcome(&r, "store-space"), Some(Outcome::Fail));
        let failed: Vec<&str> = r.failed().map(|c| c.name.as_str()).collect();
        assert_eq!(failed, ["module-vxlan", "qemu-img", "store-space"]);
        assert!(
            r.summary()
                .contains("1.0 GiB free, below the minimum of 10.0 GiB")
        );
    }

    #[test]
    fn per_node_overrides_apply_to_their_node_only() {
        let f = SettingsFile::parse(
            r#"{"defaults": {"minFreeBytes": 5}, "nodes": {"n2": {"qemuImg": "/missing/qemu-img", "minFreeBytes": 7}}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let n1 = f.for_node("n1");
        assert_eq!(n1.min_free_bytes, 5);
        assert_eq!(n1.qemu_img, PathBuf::from("qemu-img"));
        let n2 = f.for_node("n2");
        assert_eq!(n2.min_free_bytes, 7);
        assert_eq!(n2.qemu_img, PathBuf::from("/missing/qemu-img"));
        assert!(SettingsFile::parse(r#"{"nodes": {"n": {"qemuImgg": "x"}}}"#).is_err());
        assert!(SettingsFile::parse("[").is_err());
    }

    #[test]
    fn probes_follow_the_configured_paths() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let settings = Settings {
            qemu_img: dir.path().join("no-such-qemu-img"),
            tun_device: dir.path().join("no-tun"),
            sys_module: dir.path().join("sys"),
            lib_modules: dir.path().join("lib"),
            ..Settings::default()
        };
        std::fs::create_dir_all(dir.path().join("sys/bridge")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(dir.path().join("lib/6.1.0")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            dir.path().join("lib/6.1.0/modules.dep"),
            "kernel/drivers/net/vxlan/vxlan.ko.xz: kernel/net/ipv4/udp_tunnel.ko.xz\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let state = |m| module_state(&settings.sys_module, &settings.lib_modules, "6.1.0", m);
        assert_eq!(state("bridge"), ModuleState::Present);
        assert_eq!(state("vxlan"), ModuleState::Loadable);
        assert_eq!(state("tun"), ModuleState::Missing);
        let o = observe(&settings, Some(1), 9000);
        assert!(
            o.qemu_img
                .as_ref()
                .is_err_and(|e| e.contains("no-such-qemu-img")),
            "{:?}",
            o.qemu_img
        );
        assert!(
            o.tun.as_ref().is_err_and(|e| e.contains("no-tun")),
            "{:?}",
            o.tun
        );
        let r = evaluate(
            &o,
            &Settings {
                min_free_bytes: 2,
                ..settings
            },
        );
        assert_eq!(outcome(&r, "qemu-img"), Some(Outcome::Fail));
        assert_eq!(outcome(&r, "store-space"), Some(Outcome::Fail));
    }

    #[test]
    fn patches_touch_one_condition_and_one_annotation() {
        let mut o = good();
        o.nft = Err("nft list tables failed".into());
        let r = evaluate(&o, &Settings::default());
        let now = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000)
            .unwrap_or_else(|e| panic!("{e}"));
        let (status, annotation) = node_patches(&r, now, false);
        let cond = &status["status"]["conditions"][0];
        assert_eq!(cond["type"], "HvxReady");
        assert_eq!(cond["status"], "False");
        assert_eq!(cond["reason"], "PrerequisitesFailed");
        assert_eq!(cond["message"], "failed: nftables: nft list tables failed");
        assert!(cond.get("lastTransitionTime").is_none());
        assert!(
            node_patches(&r, now, true).0["status"]["conditions"][0]["lastTransitionTime"]
                .is_string()
        );
        let text = annotation["metadata"]["annotations"]["hvx.dev/prerequisites"]
            .as_str()
            .unwrap_or_default();
        let back: Report = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, r);
        let e = warning_event(&r, "n1", now).unwrap_or_default();
        assert_eq!(e["type"], "Warning");
        assert_eq!(e["metadata"]["namespace"], "default");
        assert_eq!(e["involvedObject"]["name"], "n1");
        assert!(warning_event(&evaluate(&good(), &Settings::default()), "n1", now).is_none());
    }
}
