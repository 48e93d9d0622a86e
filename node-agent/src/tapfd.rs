//! NIC taps by fd: a launcher pod has no host network, so its QEMU cannot open the
//! VM's tap (which stays in the node's network namespace, on the overlay bridge) by
//! name. The launcher asks its node agent over the seal socket (`sealcheck`), the
//! agent opens each tap (TUNSETIFF) and passes the fds back (SCM_RIGHTS); QEMU gets
//! `-netdev tap,fd=N`.
//!
//! Who may have a tap: the request carries the launcher's sealed launch spec, as a
//! seal check does. The agent verifies the seal (the spec is hvx's, for pod
//! `namespace/pod`), then identifies the caller from the kernel, not from the
//! request: SO_PEERCRED gives its pid, `/proc/<pid>/cgroup` its pod UID, and the
//! kubelet's pod log directory `<namespace>_<pod>_<uid>` on this node says whether
//! that UID is the pod the seal names. Only then are the taps of that spec (names
//! derived from its VM id) opened. Another pod replaying someone's spec and seal has
//! another UID and gets nothing.

use crate::fdpass;
use crate::sealcheck::{self, SealCheck};
use hvx_api::launch::LaunchSpec;
use hvx_api::seal::SealKey;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the agent looks to identify callers and open taps (tests point these at
/// temporary directories).
#[derive(Clone, Debug)]
pub struct TapPolicy {
    /// procfs (`/proc`): the caller's cgroup.
    pub proc_root: PathBuf,
    /// The kubelet's pod log root (`/var/log/pods`): which pod UIDs run here, by name.
    /// A `*` component stands for every directory there (the local test harness
    /// runs several kubelets on one host, each with its own root).
    pub pod_logs: PathBuf,
    /// `/sys/class/net`: whether the switch enslaved a tap.
    pub sys_net: PathBuf,
    /// `/dev/net/tun`.
    pub tun: PathBuf,
}

impl Default for TapPolicy {
    fn default() -> Self {
        Self {
            proc_root: "/proc".into(),
            pod_logs: "/var/log/pods".into(),
            sys_net: "/sys/class/net".into(),
            tun: "/dev/net/tun".into(),
        }
    }
}

/// The directories `pattern` names, each `*` component expanded to the
/// directories present there.
pub fn expand_dirs(pattern: &Path) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::new()];
    for c in pattern.components() {
        if c.as_os_str() == "*" {
            out = out
                .iter()
                .flat_map(|d| {
                    std::fs::read_dir(d)
                        .map(|r| {
                            r.flatten()
                                .map(|e| e.path())
                                .filter(|p| p.is_dir())
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default()
                })
                .collect();
        } else {
            for d in &mut out {
                d.push(c);
            }
        }
    }
    out
}

/// Whether the launcher wants the fds or only to know they are ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TapMode {
    /// Say which taps are not on the overlay yet; open nothing (while waiting: a
    /// leftover QEMU may still hold them until the launcher reaps it).
    Check,
    /// Open every tap and pass the fds (ready taps only).
    Open,
}

/// A launcher's tap request: its seal check plus the mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapRequest {
    /// The same fields a seal check sends.
    #[serde(flatten)]
    pub check: SealCheck,
    /// What it wants.
    pub taps: TapMode,
}

/// The agent's answer; with `Open` and ready, one fd per entry of `nics` rides along.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapAnswer {
    /// The caller may have these taps.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Taps not on the overlay switch yet (empty: ready).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<String>,
    /// NIC names, in the order of the passed fds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<String>,
}

fn valid_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

/// The pod UID in one cgroup path segment: cgroupfs names it `pod<uid>`, the
/// systemd driver `kubepods[-<qos>]-pod<uid with _ for ->.slice` (kind prefixes
/// `kubelet-`).
fn uid_in_segment(seg: &str) -> Option<String> {
    let raw = if let Some(rest) = seg.strip_prefix("pod") {
        rest
    } else if seg.contains("kubepods") {
        let s = seg.strip_suffix(".slice")?;
        &s[s.rfind("-pod")? + 4..]
    } else {
        return None;
    };
    let uid = raw.replace('_', "-");
    valid_uid(&uid).then_some(uid)
}

/// The pod UID of a process from its `/proc/<pid>/cgroup` (cgroup v2: one `0::`
/// line; v1: one line per hierarchy, which must agree). Pure.
pub fn pod_uid_from_cgroup(text: &str) -> Result<String, String> {
    let mut found: Option<String> = None;
    for line in text.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let Some(at) = path.find("kubepods") else {
            continue;
        };
        // The pod's segment is below (or is) the kubepods one.
        let start = path[..at].rfind('/').map_or(0, |i| i + 1);
        let Some(uid) = path[start..].split('/').find_map(uid_in_segment) else {
            continue;
        };
        match &found {
            Some(f) if *f != uid => {
                return Err(format!(
                    "the caller's cgroups name two pods ({f} and {uid})"
                ));
            }
            _ => found = Some(uid),
        }
    }
    found.ok_or_else(|| "the caller is not in a Kubernetes pod's cgroup".to_string())
}

fn dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The NICs (name, tap) the caller may have, or why not: the seal holds, the caller
/// runs in the pod the seal names, on this node.
pub fn authorize(
    key: Option<&SealKey>,
    policy: &TapPolicy,
    req: &SealCheck,
    caller_pid: Option<i32>,
) -> Result<Vec<(String, String)>, String> {
    let seal = sealcheck::answer(key, req);
    if !seal.ok {
        return Err(seal.reason.unwrap_or_else(|| "seal refused".into()));
    }
    let ls: LaunchSpec = serde_json::from_str(&req.spec)
        .map_err(|e| format!("the sealed spec is not a launch spec: {e}"))?;
    let pid = caller_pid
        .filter(|p| *p > 0)
        .ok_or("the caller's pid is unknown (SO_PEERCRED)")?;
    let cgroup_file = policy.proc_root.join(pid.to_string()).join("cgroup");
    let cgroups = std::fs::read_to_string(&cgroup_file)
        .map_err(|e| format!("reading {}: {e}", cgroup_file.display()))?;
    let uid = pod_uid_from_cgroup(&cgroups)?;
    if !dns_name(&req.namespace) || !dns_name(&req.pod) {
        return Err(format!(
            "{:?}/{:?} is not a pod name",
            req.namespace, req.pod
        ));
    }
    let pod_dir = format!("{}_{}_{uid}", req.namespace, req.pod);
    if !expand_dirs(&policy.pod_logs)
        .iter()
        .any(|root| root.join(&pod_dir).is_dir())
    {
        return Err(format!(
            "the caller (pod UID {uid}) is not pod {}/{} on this node",
            req.namespace, req.pod
        ));
    }
    ls.nics
        .iter()
        .map(|n| {
            let expected = hvx_api::launch::tap_name(&ls.vm_id, &n.name);
            if n.tap != expected {
                return Err(format!(
                    "NIC {} names tap {}, not its own {expected}",
                    n.name, n.tap
                ));
            }
            Ok((n.name.clone(), n.tap.clone()))
        })
        .collect()
}

/// Taps of `nics` the switch has not enslaved yet, as the launcher reports them.
pub fn not_ready(policy: &TapPolicy, nics: &[(String, String)]) -> Vec<String> {
    nics.iter()
        .filter(|(_, tap)| !policy.sys_net.join(tap).join("master").exists())
        .map(|(nic, tap)| format!("tap {tap} of NIC {nic} on the overlay switch"))
        .collect()
}

/// The answer to a tap request from process `caller_pid`, and the fds to pass.
pub fn answer(
    key: Option<&SealKey>,
    policy: &TapPolicy,
    req: &TapRequest,
    caller_pid: Option<i32>,
) -> (TapAnswer, Vec<OwnedFd>) {
    let refused = |reason: String| {
        (
            TapAnswer {
                ok: false,
                reason: Some(reason),
                ..TapAnswer::default()
            },
            Vec::new(),
        )
    };
    let nics = match authorize(key, policy, &req.check, caller_pid) {
        Ok(n) => n,
        Err(why) => return refused(why),
    };
    let waiting = not_ready(policy, &nics);
    let names: Vec<String> = nics.iter().map(|(n, _)| n.clone()).collect();
    if !waiting.is_empty() || req.taps == TapMode::Check {
        return (
            TapAnswer {
                ok: true,
                waiting,
                nics: if req.taps == TapMode::Check {
                    Vec::new()
                } else {
                    names
                },
                reason: None,
            },
            Vec::new(),
        );
    }
    let mut fds = Vec::with_capacity(nics.len());
    for (nic, tap) in &nics {
        match fdpass::open_tap(&policy.tun, tap) {
            Ok(fd) => fds.push(fd),
            // The fds opened so far close as `fds` drops.
            Err(e) => return refused(format!("opening tap {tap} of NIC {nic}: {e}")),
        }
    }
    (
        TapAnswer {
            ok: true,
            reason: None,
            waiting: Vec::new(),
            nics: names,
        },
        fds,
    )
}

/// Writes `answer` (one JSON line) with `fds` attached to the first bytes.
pub async fn reply(
    sock: &tokio::net::UnixStream,
    answer: &TapAnswer,
    fds: &[OwnedFd],
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(answer).unwrap_or_default();
    out.push(b'\n');
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let sent = sock
        .async_io(tokio::io::Interest::WRITABLE, || {
            fdpass::send_with_fds(sock.as_fd(), &out, &borrowed)
        })
        .await?;
    let mut rest = &out[sent..];
    while !rest.is_empty() {
        sock.writable().await?;
        match sock.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Largest answer read (a few NIC names).
const MAX_ANSWER: usize = 64 << 10;

fn ask_blocking(path: &Path, req: &TapRequest) -> std::io::Result<(TapAnswer, Vec<OwnedFd>)> {
    let mut sock = std::os::unix::net::UnixStream::connect(path)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    sock.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut out = serde_json::to_vec(req)?;
    out.push(b'\n');
    sock.write_all(&out)?;
    let mut got = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.contains(&b'\n') {
        let (n, more) = fdpass::recv_with_fds(sock.as_fd(), &mut buf)?;
        fds.extend(more);
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the node agent closed the socket before answering",
            ));
        }
        got.extend_from_slice(&buf[..n]);
        if got.len() > MAX_ANSWER {
            return Err(std::io::Error::other("answer too long"));
        }
    }
    let line = got.split(|b| *b == b'\n').next().unwrap_or_default();
    let answer: TapAnswer = serde_json::from_slice(line)?;
    Ok((answer, fds))
}

/// Asks the agent at `path` once (blocking work on tokio's blocking pool).
pub async fn ask(path: &Path, req: &TapRequest) -> Result<(TapAnswer, Vec<OwnedFd>), String> {
    let (path, req) = (path.to_path_buf(), req.clone());
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || ask_blocking(&path, &req))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("the node agent at {shown}: {e}"))
}

/// A launcher's access to its taps.
#[derive(Clone, Debug)]
pub struct TapClient {
    /// The agent's socket (`NodePaths::seal_socket`).
    pub path: PathBuf,
    /// The launcher's seal check (its pod, spec and seal).
    pub check: SealCheck,
}

/// One NIC's tap fd, owned by the launcher until QEMU inherited it.
#[derive(Debug)]
pub struct NicFd {
    /// NIC name.
    pub nic: String,
    /// The open tap.
    pub fd: OwnedFd,
}

impl TapClient {
    /// Taps not ready yet (an unreachable agent counts as not ready: it may be
    /// restarting); Err when the agent refuses this launcher.
    pub async fn waiting(&self) -> Result<Vec<String>, String> {
        let req = TapRequest {
            check: self.check.clone(),
            taps: TapMode::Check,
        };
        match ask(&self.path, &req).await {
            Ok((a, _)) if a.ok => Ok(a.waiting),
            Ok((a, _)) => Err(a.reason.unwrap_or_else(|| "refused".into())),
            Err(e) => Ok(vec![format!("the node agent's tap socket ({e})")]),
        }
    }

    /// The fd of every NIC's tap.
    pub async fn open(&self) -> Result<Vec<NicFd>, String> {
        let req = TapRequest {
            check: self.check.clone(),
            taps: TapMode::Open,
        };
        let (a, fds) = ask(&self.path, &req).await?;
        if !a.ok {
            return Err(a.reason.unwrap_or_else(|| "refused".into()));
        }
        if !a.waiting.is_empty() {
            return Err(format!("taps not ready: {}", a.waiting.join(", ")));
        }
        if fds.len() != a.nics.len() {
            return Err(format!(
                "the node agent sent {} fds for {} NICs",
                fds.len(),
                a.nics.len()
            ));
        }
        Ok(a.nics
            .into_iter()
            .zip(fds)
            .map(|(nic, fd)| NicFd { nic, fd })
            .collect())
    }
}

/// `spec` with each tap NIC backed by its fd in `fds` (matched by NIC name). The fds
/// must stay open until QEMU started.
pub fn with_tap_fds(spec: &hvx_vmm::VmSpec, fds: &[NicFd]) -> Result<hvx_vmm::VmSpec, String> {
    use std::os::fd::AsRawFd;
    let mut out = spec.clone();
    for n in &mut out.nics {
        if let hvx_vmm::spec::NicBackend::Tap { fd, .. } = &mut n.backend {
            let passed = fds
                .iter()
                .find(|f| f.nic == n.name)
                .ok_or_else(|| format!("the node agent passed no tap for NIC {}", n.name))?;
            *fd = Some(passed.fd.as_raw_fd());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b5e8c1a-4f2d-4c3b-9a7e-1d2c3b4a5f60";

    const OTHER: &str = "11111111-2222-3333-4444-555555555555";

    fn key() -> SealKey {
        SealKey::new(b"0123456789abcdef0123456789abcdef")
    }

    /// A sealed request of pod default/`pod` for a VM `vm_id` with one NIC eth0.
    fn sealed(pod: &str, vm_id: &str) -> (SealCheck, String) {
        let mut ls = crate::launcher::map::fixture();
        ls.vm_id = vm_id.into();
        ls.nics[0].tap = hvx_api::launch::tap_name(vm_id, "eth0");
        let spec = serde_json::to_string(&ls).expect("json");
        let subject = hvx_api::seal::Subject {
            namespace: "default",
            pod,
            owner_uid: "u-1",
        };
        let seal = key().seal(&subject, hvx_api::seal::Sealed::LaunchSpec, &spec);
        let tap = ls.nics[0].tap.clone();
        (
            SealCheck {
                namespace: "default".into(),
                pod: pod.into(),
                owner_uid: "u-1".into(),
                spec,
                seal,
            },
            tap,
        )
    }

    /// A node with two launcher pods: shop-web (UID, pid 100) and shop-db (OTHER,
    /// pid 200).
    fn node() -> (tempfile::TempDir, TapPolicy) {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = TapPolicy {
            proc_root: dir.path().join("proc"),
            pod_logs: dir.path().join("pods"),
            sys_net: dir.path().join("net"),
            tun: "/nonexistent/tun".into(),
        };
        for (pid, pod, uid) in [(100, "shop-web", UID), (200, "shop-db", OTHER)] {
            let p = policy.proc_root.join(pid.to_string());
            std::fs::create_dir_all(&p).expect("mkdir");
            std::fs::write(
                p.join("cgroup"),
                format!("0::/kubepods/besteffort/pod{uid}/c{pid}\n"),
            )
            .expect("cgroup");
            std::fs::create_dir_all(policy.pod_logs.join(format!("default_{pod}_{uid}")))
                .expect("pod dir");
        }
        std::fs::create_dir_all(policy.proc_root.join("300")).expect("mkdir");
        std::fs::write(
            policy.proc_root.join("300/cgroup"),
            "0::/system.slice/sshd.service\n",
        )
        .expect("cgroup");
        (dir, policy)
    }

    #[test]
    fn only_the_pod_the_seal_names_gets_its_vms_taps() {
        let (_dir, policy) = node();
        let (web, web_tap) = sealed("shop-web", "u-1/web");
        assert_eq!(
            authorize(Some(&key()), &policy, &web, Some(100)),
            Ok(vec![("eth0".to_string(), web_tap.clone())])
        );
        // shop-db's launcher replays shop-web's sealed request: its cgroup names
        // another pod.
        let stolen = authorize(Some(&key()), &policy, &web, Some(200)).expect_err("refused");
        assert!(stolen.contains("is not pod default/shop-web"), "{stolen}");
        // A process outside any pod, an unknown pid, no pid.
        assert!(authorize(Some(&key()), &policy, &web, Some(300)).is_err());
        assert!(authorize(Some(&key()), &policy, &web, Some(999)).is_err());
        assert!(authorize(Some(&key()), &policy, &web, None).is_err());
        // shop-db asking with its own name and web's spec: the seal does not hold.
        let mut renamed = web.clone();
        renamed.pod = "shop-db".into();
        let forged = authorize(Some(&key()), &policy, &renamed, Some(200)).expect_err("refused");
        assert!(!forged.contains("shop-web"), "{forged}");
        // Its own sealed spec with web's tap in it: refused (the tap is not its VM's).
        let (mut db, _) = sealed("shop-db", "u-1/db");
        let mut ls: LaunchSpec = serde_json::from_str(&db.spec).expect("spec");
        ls.nics[0].tap = web_tap.clone();
        db.spec = serde_json::to_string(&ls).expect("json");
        db.seal = key().seal(
            &hvx_api::seal::Subject {
                namespace: "default",
                pod: "shop-db",
                owner_uid: "u-1",
            },
            hvx_api::seal::Sealed::LaunchSpec,
            &db.spec,
        );
        let other_tap = authorize(Some(&key()), &policy, &db, Some(200)).expect_err("refused");
        assert!(other_tap.contains("not its own"), "{other_tap}");
        // No key on the agent: nothing.
        assert!(authorize(None, &policy, &web, Some(100)).is_err());
    }

    #[test]
    fn taps_are_reported_until_enslaved_and_refusals_pass_no_fd() {
        let (_dir, policy) = node();
        let (web, tap) = sealed("shop-web", "u-1/web");
        let check = TapRequest {
            check: web.clone(),
            taps: TapMode::Check,
        };
        let (a, fds) = answer(Some(&key()), &policy, &check, Some(100));
        assert!(a.ok, "{a:?}");
        assert_eq!(
            a.waiting,
            [format!("tap {tap} of NIC eth0 on the overlay switch")]
        );
        assert!(fds.is_empty());
        let open = TapRequest {
            check: web,
            taps: TapMode::Open,
        };
        // Not enslaved: no open attempted (the tun path does not exist here).
        let (a, fds) = answer(Some(&key()), &policy, &open, Some(100));
        assert!(a.ok && !a.waiting.is_empty() && fds.is_empty(), "{a:?}");
        std::fs::create_dir_all(policy.sys_net.join(&tap).join("master")).expect("enslave");
        let (a, _) = answer(Some(&key()), &policy, &check, Some(100));
        assert!(a.ok && a.waiting.is_empty(), "{a:?}");
        // Ready, but opening fails: a refusal with the reason, no fds.
        let (a, fds) = answer(Some(&key()), &policy, &open, Some(100));
        assert!(!a.ok && fds.is_empty(), "{a:?}");
        assert!(a.reason.unwrap_or_default().contains("opening tap"));
        // Another pod: refused, no fds.
        let (a, fds) = answer(Some(&key()), &policy, &open, Some(200));
        assert!(!a.ok && fds.is_empty(), "{a:?}");
    }

    #[tokio::test]
    async fn the_seal_socket_answers_tap_requests_by_the_callers_cgroup() {
        let (_dir, policy) = node();
        // This process is the caller: its pid's cgroup file says which pod it is.
        let me = policy.proc_root.join(std::process::id().to_string());
        std::fs::create_dir_all(&me).expect("mkdir");
        let as_pod = |uid: &str| {
            std::fs::write(
                me.join("cgroup"),
                format!("0::/kubepods/besteffort/pod{uid}/c\n"),
            )
            .expect("cgroup")
        };
        let socket = policy.sys_net.with_file_name("seal.sock");
        let server = tokio::spawn({
            let (socket, policy) = (socket.clone(), policy.clone());
            async move { crate::sealcheck::serve_with(&socket, Some(key()), policy).await }
        });
        let (web, tap) = sealed("shop-web", "u-1/web");
        let client = TapClient {
            path: socket.clone(),
            check: web.clone(),
        };
        as_pod(UID);
        let mut waiting = Err(String::new());
        for _ in 0..50 {
            waiting = client.waiting().await;
            if !matches!(&waiting, Ok(w) if w.iter().any(|m| m.contains("socket"))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            waiting,
            Ok(vec![format!("tap {tap} of NIC eth0 on the overlay switch")])
        );
        as_pod(OTHER);
        let refused = client.waiting().await.expect_err("another pod");
        assert!(refused.contains("is not pod default/shop-web"), "{refused}");
        assert!(client.open().await.is_err());
        // A plain seal check on the same socket still gets its yes/no.
        let plain = crate::sealcheck::ask(&socket, &web, Duration::from_secs(5))
            .await
            .expect("answer");
        assert!(plain.ok, "{plain:?}");
        server.abort();
    }

    #[test]
    fn pod_log_roots_may_hold_one_level_wildcards() {
        let dir = tempfile::tempdir().expect("tempdir");
        for n in ["1", "2"] {
            std::fs::create_dir_all(dir.path().join(n).join("pod-logs")).expect("mkdir");
        }
        std::fs::write(dir.path().join("file"), b"").expect("file");
        let mut found = expand_dirs(&dir.path().join("*/pod-logs"));
        found.sort();
        assert_eq!(
            found,
            [dir.path().join("1/pod-logs"), dir.path().join("2/pod-logs")]
        );
        assert_eq!(
            expand_dirs(Path::new("/var/log/pods")),
            [PathBuf::from("/var/log/pods")]
        );
    }

    #[test]
    fn pod_uid_from_cgroup_v2_systemd_and_cgroupfs() {
        let systemd = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b5e8c1a_4f2d_4c3b_9a7e_1d2c3b4a5f60.slice/cri-containerd-4e1f.scope\n";
        assert_eq!(pod_uid_from_cgroup(systemd).as_deref(), Ok(UID));
        let guaranteed = "0::/kubepods.slice/kubepods-pod0b5e8c1a_4f2d_4c3b_9a7e_1d2c3b4a5f60.slice/cri-containerd-4e1f.scope\n";
        assert_eq!(pod_uid_from_cgroup(guaranteed).as_deref(), Ok(UID));
        let cgroupfs = format!("0::/kubepods/besteffort/pod{UID}/4e1f0a\n");
        assert_eq!(pod_uid_from_cgroup(&cgroupfs).as_deref(), Ok(UID));
        // kind (kubelet cgroup root /kubelet), seen from the agent's cgroup namespace.
        let kind = "0::/../../kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod0b5e8c1a_4f2d_4c3b_9a7e_1d2c3b4a5f60.slice/cri-containerd-9a.scope\n";
        assert_eq!(pod_uid_from_cgroup(kind).as_deref(), Ok(UID));
        // The local harness: cgroupfs under a per-node cgroup root, cgroup v1.
        let harness = format!(
            "11:memory:/hvx-node-2/kubepods/besteffort/pod{UID}/ab12\n4:pids:/hvx-node-2/kubepods/besteffort/pod{UID}/ab12\n"
        );
        assert_eq!(pod_uid_from_cgroup(&harness).as_deref(), Ok(UID));
    }

    #[test]
    fn pod_uid_from_cgroup_v1_lines_must_agree() {
        let v1 = format!(
            "12:memory:/kubepods/burstable/pod{UID}/c1\n11:cpu,cpuacct:/kubepods/burstable/pod{UID}/c1\n1:name=systemd:/system.slice/containerd.service\n0::/\n"
        );
        assert_eq!(pod_uid_from_cgroup(&v1).as_deref(), Ok(UID));
        let mixed = format!(
            "12:memory:/kubepods/burstable/pod{UID}/c1\n11:cpu:/kubepods/burstable/pod11111111-2222-3333-4444-555555555555/c1\n"
        );
        assert!(
            pod_uid_from_cgroup(&mixed)
                .expect_err("two pods")
                .contains("two pods")
        );
    }

    #[test]
    fn processes_outside_pods_have_no_pod_uid() {
        for text in [
            "0::/system.slice/hvx-node-agent.service\n",
            "0::/user.slice/user-0.slice/session-1.scope\n",
            "0::/kubepods/besteffort/podnot-a-uid/c1\n",
            // A "pod" segment outside kubepods is no pod.
            &format!("0::/system.slice/pod{UID}/x\n"),
            "",
        ] {
            assert!(pod_uid_from_cgroup(text).is_err(), "{text}");
        }
    }
}
