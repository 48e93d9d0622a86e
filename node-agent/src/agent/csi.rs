//! The `vm.hvx.dev` CSI driver: how a launcher pod gets its VM's directories without
//! hostPath (which Pod Security `baseline` forbids). A launcher pod declares two CSI
//! ephemeral inline volumes of this driver (`hvx.dev/tree: store` and `run`); the
//! kubelet asks this agent to publish each with the pod's name, namespace and uid
//! (`podInfoOnMount`). The agent fetches that pod, accepts it only as a launcher hvx
//! made for a VM on this node (sealed launch spec, `sealcheck`), and then mounts at the
//! target exactly that VM's directories, at the same relative paths as on the node
//! (qcow2 backing files name absolute store paths):
//! - store: the VM's overlay directory (rw) and the base image of each of its disks (ro);
//! - run: the VM's run dir (rw) and the directory of the agent's launcher socket (ro).
//!
//! Mounts are made in the kubelet's mount namespace (`nsenter -t <kubelet pid> -m`;
//! the agent is privileged with hostPID; pid 1's namespace may not be open to it), on
//! a small tmpfs at the target, so no mount propagation setting is needed anywhere;
//! file system work on the target goes through `/proc/<kubelet pid>/root`. Anything else is refused with PERMISSION_DENIED, whose message the
//! kubelet puts in the pod's events.

use super::Agent;
use super::error::AgentError;
use super::plugin_registration::PluginRegistration;
use hvx_api::labels::{ANNOTATION_LAUNCH_SPEC, LABEL_ROLE, ROLE_LAUNCHER};
use hvx_api::launch::LaunchSpec;
use hvx_api::node::NodePaths;
use hvx_api::seal::SealKey;
use hvx_proto::csi as pb;
use hvx_proto::pluginregistration as reg;
use k8s_openapi::api::core::v1::Pod;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The driver's name (the chart's CSIDriver object).
pub const DRIVER_NAME: &str = hvx_api::node::VM_CSI_DRIVER;
/// The volume attribute naming which tree a volume is.
pub const TREE_ATTRIBUTE: &str = hvx_api::node::VM_CSI_TREE;
/// Where a launcher container mounts the store tree (the node's store root there).
pub const POD_STORE_ROOT: &str = hvx_api::node::DEFAULT_STORE_ROOT;
/// Where a launcher container mounts the run tree.
pub const POD_RUN_ROOT: &str = hvx_api::node::DEFAULT_RUN_ROOT;
/// The container of a launcher pod (the operator's pod builder names it so).
pub const LAUNCHER_CONTAINER: &str = "launcher";
/// Longest a publish waits for the VM's overlays (the operator has the agent make
/// them once the pod is bound here); then the kubelet retries.
const DISKS_WAIT: Duration = Duration::from_secs(60);

const POD_NAME_KEY: &str = "csi.storage.k8s.io/pod.name";
const POD_NAMESPACE_KEY: &str = "csi.storage.k8s.io/pod.namespace";
const POD_UID_KEY: &str = "csi.storage.k8s.io/pod.uid";
const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";

/// Which of a VM's trees a volume carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tree {
    /// Below the store root: overlays and their bases.
    Store,
    /// Below the run root: run dir and the agent's launcher socket.
    Run,
}

/// The pod a publish is for, as the kubelet says (`podInfoOnMount`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishFor {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod uid.
    pub uid: String,
    /// Which tree.
    pub tree: Tree,
}

/// Reads a NodePublishVolume's volume context. Pure. The kubelet writes the pod keys
/// over whatever the pod's volumeAttributes said, so they name the real pod.
pub fn parse_volume_context(ctx: &HashMap<String, String>) -> Result<PublishFor, AgentError> {
    let get = |k: &str| {
        ctx.get(k)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| {
                AgentError::Invalid(format!(
                    "volume context has no {k}: the CSIDriver {DRIVER_NAME} needs podInfoOnMount: true"
                ))
            })
    };
    if ctx.get(EPHEMERAL_KEY).map(String::as_str) != Some("true") {
        return Err(AgentError::Invalid(format!(
            "{DRIVER_NAME} serves only CSI ephemeral inline volumes of launcher pods"
        )));
    }
    let tree = match ctx.get(TREE_ATTRIBUTE).map(String::as_str) {
        Some("store") => Tree::Store,
        Some("run") => Tree::Run,
        other => {
            return Err(AgentError::Invalid(format!(
                "volume attribute {TREE_ATTRIBUTE} must be \"store\" or \"run\", not {other:?}"
            )));
        }
    };
    Ok(PublishFor {
        namespace: get(POD_NAMESPACE_KEY)?,
        name: get(POD_NAME_KEY)?,
        uid: get(POD_UID_KEY)?,
        tree,
    })
}

fn refused(why: impl std::fmt::Display) -> AgentError {
    AgentError::Refused(format!(
        "{DRIVER_NAME} mounts VM directories only into launcher pods hvx made: {why}"
    ))
}

/// Checks that `pod` is the launcher pod hvx made for a VM on `node`, and is the pod
/// the kubelet publishes for; returns its launch spec. Pure.
pub fn verify_launcher_pod(
    pod: &Pod,
    want: &PublishFor,
    node: &str,
    key: Option<&SealKey>,
) -> Result<LaunchSpec, AgentError> {
    let meta = &pod.metadata;
    if meta.uid.as_deref() != Some(want.uid.as_str()) {
        return Err(refused(format!(
            "pod {}/{} is not the pod being mounted (uid differs)",
            want.namespace, want.name
        )));
    }
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| refused("pod has no spec"))?;
    if spec.node_name.as_deref() != Some(node) {
        return Err(refused(format!("pod is not bound to this node {node}")));
    }
    let labels = meta.labels.clone().unwrap_or_default();
    if labels.get(LABEL_ROLE).map(String::as_str) != Some(ROLE_LAUNCHER) {
        return Err(refused(format!(
            "pod is not labelled {LABEL_ROLE}={ROLE_LAUNCHER}"
        )));
    }
    let container = spec
        .containers
        .iter()
        .find(|c| c.name == LAUNCHER_CONTAINER)
        .ok_or_else(|| refused(format!("pod has no container {LAUNCHER_CONTAINER}")))?;
    // A literal in the container spec: nobody can change it after creation.
    let owner_uid = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "HVX_OWNER_UID" && e.value_from.is_none())
        .and_then(|e| e.value.clone())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| refused("launcher container has no HVX_OWNER_UID"))?;
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    if controller.map(|o| (o.kind.as_str(), o.uid.as_str())) != Some(("VmApplication", &owner_uid))
    {
        return Err(refused(
            "pod is not controlled by the VmApplication it names",
        ));
    }
    let annotations = meta.annotations.clone().unwrap_or_default();
    let text = annotations
        .get(ANNOTATION_LAUNCH_SPEC)
        .cloned()
        .ok_or_else(|| refused(format!("pod has no {ANNOTATION_LAUNCH_SPEC} annotation")))?;
    let seal = annotations
        .get(hvx_api::seal::Sealed::LaunchSpec.seal_key())
        .cloned()
        .unwrap_or_default();
    let answer = crate::sealcheck::answer(
        key,
        &crate::sealcheck::SealCheck {
            namespace: want.namespace.clone(),
            pod: want.name.clone(),
            owner_uid,
            spec: text.clone(),
            seal,
        },
    );
    if !answer.ok {
        return Err(refused(format!(
            "its launch spec is not one hvx sealed for it ({})",
            answer.reason.unwrap_or_default()
        )));
    }
    let ls: LaunchSpec =
        serde_json::from_str(&text).map_err(|e| refused(format!("unreadable launch spec: {e}")))?;
    if ls.namespace != want.namespace {
        return Err(refused("launch spec names another namespace"));
    }
    super::vms::check_vm_uid(&ls.vm_id)?;
    Ok(ls)
}

/// One bind mount of a publish: `source` on the node at `rel` below the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    /// Node path.
    pub source: PathBuf,
    /// Path below the volume's target (the same as `source` below its root).
    pub rel: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
    /// A file (else a directory).
    pub file: bool,
}

fn below(root: &Path, p: &Path) -> Result<PathBuf, AgentError> {
    let rel = p.strip_prefix(root).map_err(|_| {
        AgentError::Invalid(format!("{} is not below {}", p.display(), root.display()))
    })?;
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) || rel.as_os_str().is_empty() {
        return Err(AgentError::Invalid(format!("bad path {}", p.display())));
    }
    Ok(rel.to_path_buf())
}

/// What a publish of `tree` mounts for VM `ls`; `bases` are the base images of its
/// disks (store tree). Pure.
pub fn plan(
    tree: Tree,
    ls: &LaunchSpec,
    paths: &NodePaths,
    store_root: &Path,
    run_root: &Path,
    bases: &[PathBuf],
) -> Result<Vec<Bind>, AgentError> {
    let mut out = Vec::new();
    match tree {
        Tree::Store => {
            let overlays = vm_overlay_dir(paths, &ls.vm_id);
            out.push(Bind {
                rel: below(store_root, &overlays)?,
                source: overlays,
                read_only: false,
                file: false,
            });
            for b in bases {
                out.push(Bind {
                    rel: below(store_root, b)?,
                    source: b.clone(),
                    read_only: true,
                    file: true,
                });
            }
        }
        Tree::Run => {
            let run_dir = paths.vm_run_dir(&ls.vm_id);
            out.push(Bind {
                rel: below(run_root, &run_dir)?,
                source: run_dir,
                read_only: false,
                file: false,
            });
            let sockets = paths.launcher_socket_dir();
            out.push(Bind {
                rel: below(run_root, &sockets)?,
                source: sockets,
                read_only: true,
                file: false,
            });
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    out.dedup_by(|a, b| a.rel == b.rel);
    Ok(out)
}

/// The directory of all of a VM's overlays in the disk store.
fn vm_overlay_dir(paths: &NodePaths, vm_id: &str) -> PathBuf {
    let (ns, _) = hvx_api::node::vm_overlay_ref(vm_id, "x");
    paths.disk_store().join("disks").join(ns)
}

/// Checks a kubelet target path: absolute, plain, below `<kubelet root>/pods/`. Pure.
pub fn check_target(target: &str, kubelet_root: &Path) -> Result<PathBuf, AgentError> {
    let p = PathBuf::from(target);
    let pods = kubelet_root.join("pods");
    if !p.is_absolute()
        || p.components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || !p.starts_with(&pods)
        || p == pods
    {
        return Err(AgentError::Invalid(format!(
            "target path {target:?} is not below {}",
            pods.display()
        )));
    }
    Ok(p)
}

/// Whether a NUL-separated command line is the kubelet's of root dir `root` (a
/// kubelet without `--root-dir` has the default root). Pure.
pub fn is_kubelet_of(cmdline: &[u8], root: &Path) -> bool {
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let Some(bin) = args.first() else {
        return false;
    };
    if Path::new(bin).file_name().and_then(|n| n.to_str()) != Some("kubelet") {
        return false;
    }
    let root = root.to_string_lossy();
    let mut given = None;
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix("--root-dir=") {
            given = Some(v.to_string());
        } else if a == "--root-dir" {
            given = args.get(i + 1).cloned();
        }
    }
    given
        .as_deref()
        .unwrap_or("/var/lib/kubelet")
        .trim_end_matches('/')
        == root.trim_end_matches('/')
}

/// The pid of this node's kubelet: its mount namespace is where volumes are mounted
/// (the host's, on every real node; pid 1's may not be open to the agent).
fn kubelet_pid(root: &Path) -> Result<u32, AgentError> {
    std::fs::read_dir("/proc")
        .map_err(AgentError::io("listing /proc"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .ok()
                .is_some_and(|c| is_kubelet_of(&c, root))
        })
        .ok_or_else(|| {
            AgentError::Host(format!(
                "no kubelet with root dir {} on this node",
                root.display()
            ))
        })
}

/// `p` (a node path) as the agent reaches it in the mount namespace of `ns_pid`.
fn host_view(ns_pid: u32, p: &Path) -> PathBuf {
    Path::new(&format!("/proc/{ns_pid}/root")).join(p.strip_prefix("/").unwrap_or(p))
}

/// Mount points in the mount namespace of `ns_pid`.
fn host_mounts(ns_pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{ns_pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

/// Whether `p` is a mount point in the mount namespace of `ns_pid`.
fn host_mounted(ns_pid: u32, p: &Path) -> bool {
    let want = p.to_string_lossy();
    host_mounts(ns_pid).iter().any(|m| *m == want)
}

/// Runs a mount tool in the mount namespace of `ns_pid`.
async fn in_host_ns(ns_pid: u32, args: &[&str]) -> Result<(), AgentError> {
    let pid = ns_pid.to_string();
    let out = tokio::process::Command::new("nsenter")
        .args(["-t", &pid, "-m", "--"])
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(AgentError::io(format!(
            "running nsenter {}",
            args.join(" ")
        )))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(AgentError::Host(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Mounts `binds` on a fresh tmpfs at `target` (node paths). On failure nothing stays
/// mounted.
async fn mount_all(ns_pid: u32, target: &Path, binds: &[Bind]) -> Result<(), AgentError> {
    let t = target.to_string_lossy().into_owned();
    std::fs::create_dir_all(host_view(ns_pid, target))
        .map_err(AgentError::io(format!("creating {t}")))?;
    in_host_ns(
        ns_pid,
        &[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=1m,mode=0755,nosuid,nodev",
            "hvx-vm",
            &t,
        ],
    )
    .await?;
    let result = async {
        for b in binds {
            let at = target.join(&b.rel);
            let view = host_view(ns_pid, &at);
            if let Some(parent) = view.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(AgentError::io(format!("creating {}", at.display())))?;
            }
            if b.file {
                std::fs::File::create(&view)
                    .map_err(AgentError::io(format!("creating {}", at.display())))?;
            } else {
                std::fs::create_dir_all(&view)
                    .map_err(AgentError::io(format!("creating {}", at.display())))?;
            }
            let opts = if b.read_only {
                "bind,ro,nosuid,nodev"
            } else {
                "bind,nosuid,nodev"
            };
            in_host_ns(
                ns_pid,
                &[
                    "mount",
                    "-o",
                    opts,
                    &b.source.to_string_lossy(),
                    &at.to_string_lossy(),
                ],
            )
            .await?;
        }
        Ok::<_, AgentError>(())
    }
    .await;
    if result.is_err() {
        let _ = in_host_ns(ns_pid, &["umount", "-R", &t]).await;
    }
    result
}

/// The base image of each of the VM's disks once all its overlays exist (None: not
/// all there yet).
fn disk_bases(agent: &Agent, ls: &LaunchSpec) -> Result<Option<Vec<PathBuf>>, AgentError> {
    let resolver = crate::launcher::map::StoreResolver {
        store_root: agent.paths.disk_store(),
        vm_id: ls.vm_id.clone(),
    };
    let mut out = Vec::new();
    for d in &ls.disks {
        let Ok(text) = std::fs::read(resolver.meta_path(&d.name)) else {
            return Ok(None);
        };
        let meta: hvx_storage::chain::DiskMeta = serde_json::from_slice(&text).map_err(|e| {
            AgentError::Invalid(format!("disk {}: unreadable disk.json: {e}", d.name))
        })?;
        if meta.base.is_empty() || meta.base.contains('/') || meta.base.contains("..") {
            return Err(AgentError::Invalid(format!(
                "disk {}: bad base {:?}",
                d.name, meta.base
            )));
        }
        out.push(agent.store.base_path(&meta.base));
    }
    Ok(Some(out))
}

/// The CSI Identity and Node services of this node's agent.
#[derive(Clone)]
pub struct CsiDriver {
    /// The node's agent.
    pub agent: Arc<Agent>,
    /// Reads launcher pods.
    pub client: kube::Client,
    /// The launch spec seal key.
    pub seal_key: Arc<Option<SealKey>>,
    /// The kubelet's root dir on the node (what the kubelet is told, and where its
    /// target paths are).
    pub kubelet_root: PathBuf,
    /// Where this agent has the kubelet root's `plugins_registry/` and
    /// `plugins/vm.hvx.dev/` mounted (the chart mounts just those two).
    pub kubelet_mount: PathBuf,
}

impl std::fmt::Debug for CsiDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsiDriver")
            .field("kubelet_root", &self.kubelet_root)
            .finish_non_exhaustive()
    }
}

impl CsiDriver {
    async fn publish(&self, req: &pb::NodePublishVolumeRequest) -> Result<(), AgentError> {
        let target = check_target(&req.target_path, &self.kubelet_root)?;
        let want = parse_volume_context(&req.volume_context)?;
        let ns_pid = kubelet_pid(&self.kubelet_root)?;
        if host_mounted(ns_pid, &target) {
            return Ok(());
        }
        let api: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), &want.namespace);
        let pod = api
            .get_opt(&want.name)
            .await
            .map_err(|e| {
                AgentError::Retry(format!("reading pod {}/{}: {e}", want.namespace, want.name))
            })?
            .ok_or_else(|| refused(format!("no pod {}/{}", want.namespace, want.name)))?;
        let node = &self.agent.config.node_name;
        let ls = verify_launcher_pod(&pod, &want, node, Option::as_ref(&*self.seal_key))
            .inspect_err(|e| {
                tracing::warn!(namespace = %want.namespace, pod = %want.name, error = %e, "refused a {DRIVER_NAME} volume");
            })?;
        let paths = &self.agent.paths;
        let bases = match want.tree {
            Tree::Run => {
                let dir = paths.vm_run_dir(&ls.vm_id);
                std::fs::create_dir_all(&dir)
                    .map_err(AgentError::io(format!("creating {}", dir.display())))?;
                Vec::new()
            }
            Tree::Store => {
                let dir = vm_overlay_dir(paths, &ls.vm_id);
                std::fs::create_dir_all(&dir)
                    .map_err(AgentError::io(format!("creating {}", dir.display())))?;
                let deadline = tokio::time::Instant::now() + DISKS_WAIT;
                loop {
                    if let Some(b) = disk_bases(&self.agent, &ls)? {
                        break b;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(AgentError::Retry(format!(
                            "the overlays of VM {} are not prepared on this node yet",
                            ls.vm_id
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        let binds = plan(
            want.tree,
            &ls,
            paths,
            &self.agent.config.store_root,
            &self.agent.config.run_root,
            &bases,
        )?;
        mount_all(ns_pid, &target, &binds).await?;
        tracing::info!(namespace = %want.namespace, pod = %want.name, vm = %ls.vm_id, tree = ?want.tree, "published VM directories");
        Ok(())
    }

    async fn unpublish(&self, req: &pb::NodeUnpublishVolumeRequest) -> Result<(), AgentError> {
        let target = check_target(&req.target_path, &self.kubelet_root)?;
        let ns_pid = kubelet_pid(&self.kubelet_root)?;
        // VM run dirs below the target: emptied by their launcher, removed here once
        // unmounted (the launcher cannot remove its mount point).
        let run_dirs: Vec<PathBuf> = std::fs::read_dir(host_view(
            ns_pid,
            &target.join(below(
                &self.agent.config.run_root,
                &self.agent.paths.vms_dir(),
            )?),
        ))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| self.agent.paths.vms_dir().join(e.file_name()))
        .collect();
        if host_mounted(ns_pid, &target) {
            in_host_ns(ns_pid, &["umount", "-R", &target.to_string_lossy()]).await?;
        }
        match std::fs::remove_dir(host_view(ns_pid, &target)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(AgentError::Io {
                    what: format!("removing {}", target.display()),
                    source: e,
                });
            }
        }
        for d in run_dirs {
            let _ = std::fs::remove_dir(d);
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for CsiDriver {
    async fn get_plugin_info(
        &self,
        _: tonic::Request<pb::GetPluginInfoRequest>,
    ) -> Result<tonic::Response<pb::GetPluginInfoResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: tonic::Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<tonic::Response<pb::GetPluginCapabilitiesResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::GetPluginCapabilitiesResponse {}))
    }

    async fn probe(
        &self,
        _: tonic::Request<pb::ProbeRequest>,
    ) -> Result<tonic::Response<pb::ProbeResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ProbeResponse {}))
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for CsiDriver {
    async fn node_publish_volume(
        &self,
        req: tonic::Request<pb::NodePublishVolumeRequest>,
    ) -> Result<tonic::Response<pb::NodePublishVolumeResponse>, tonic::Status> {
        self.publish(req.get_ref())
            .await
            .map_err(tonic::Status::from)?;
        Ok(tonic::Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: tonic::Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<tonic::Response<pb::NodeUnpublishVolumeResponse>, tonic::Status> {
        self.unpublish(req.get_ref())
            .await
            .map_err(tonic::Status::from)?;
        Ok(tonic::Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _: tonic::Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<tonic::Response<pb::NodeGetCapabilitiesResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::NodeGetCapabilitiesResponse {}))
    }

    async fn node_get_info(
        &self,
        _: tonic::Request<pb::NodeGetInfoRequest>,
    ) -> Result<tonic::Response<pb::NodeGetInfoResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::NodeGetInfoResponse {
            node_id: self.agent.config.node_name.clone(),
            max_volumes_per_node: 0,
        }))
    }
}

/// The kubelet's plugin registration of this driver, whose socket is `endpoint` on
/// the kubelet's host.
pub fn registration(endpoint: PathBuf) -> PluginRegistration {
    PluginRegistration {
        kind: "CSIPlugin",
        name: DRIVER_NAME,
        endpoint,
        versions: &["1.0.0"],
    }
}

fn unix_listener(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    tokio::net::UnixListener::bind(path)
}

/// The driver's socket and its registration socket below a kubelet root dir.
fn socket_paths(kubelet_root: &Path) -> (PathBuf, PathBuf) {
    (
        kubelet_root
            .join("plugins")
            .join(DRIVER_NAME)
            .join("csi.sock"),
        kubelet_root
            .join("plugins_registry")
            .join(format!("{DRIVER_NAME}-reg.sock")),
    )
}

/// Removes the driver's sockets (agent shutdown), `kubelet_mount` as in
/// [`CsiDriver`]: the kubelet deregisters the driver when its registration socket
/// goes, instead of calling a dead one.
pub fn remove_sockets(kubelet_mount: &Path) {
    let (endpoint, registration) = socket_paths(kubelet_mount);
    let _ = std::fs::remove_file(registration);
    let _ = std::fs::remove_file(endpoint);
}

/// Serves the driver on `<kubelet root>/plugins/vm.hvx.dev/csi.sock` and registers it
/// with the kubelet (`<kubelet root>/plugins_registry/`) until the task is dropped
/// (both reached through `kubelet_mount`).
pub async fn serve(driver: CsiDriver) -> std::io::Result<()> {
    let (endpoint, _) = socket_paths(&driver.kubelet_root);
    let (local_endpoint, registration_socket) = socket_paths(&driver.kubelet_mount);
    let csi = unix_listener(&local_endpoint)?;
    let csi_server = tonic::transport::Server::builder()
        .add_service(pb::identity_server::IdentityServer::new(driver.clone()))
        .add_service(pb::node_server::NodeServer::new(driver))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(csi));
    // The registration socket last: the kubelet connects to the driver right away.
    // Through the authority shim: the kubelet's registration client sends this
    // socket's path as :authority, which tonic's h2 refuses.
    let reg_listener = unix_listener(&registration_socket)?;
    let reg_server = tonic::transport::Server::builder()
        .add_service(reg::registration_server::RegistrationServer::new(
            registration(endpoint),
        ))
        .serve_with_incoming(super::authority_shim::incoming(reg_listener));
    let (a, b) = tokio::join!(csi_server, reg_server);
    a.and(b).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvx_api::seal::{Sealed, Subject};
    use serde_json::json;

    fn key() -> SealKey {
        SealKey::new(b"0123456789abcdef0123456789abcdef")
    }

    fn context(tree: &str) -> HashMap<String, String> {
        [
            (POD_NAME_KEY, "shop-web"),
            (POD_NAMESPACE_KEY, "prod"),
            (POD_UID_KEY, "p-1"),
            (EPHEMERAL_KEY, "true"),
            (TREE_ATTRIBUTE, tree),
            ("csi.storage.k8s.io/serviceAccount.name", "default"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn launch_spec(vm_id: &str) -> String {
        let mut ls = crate::launcher::map::fixture();
        ls.namespace = "prod".into();
        ls.vm_id = vm_id.into();
        serde_json::to_string(&ls).expect("json")
    }

    /// The pod the operator makes for VM `u-1/web`, sealed for it.
    fn pod(spec: &str, sealed_spec: &str) -> Pod {
        let seal = key().seal(
            &Subject {
                namespace: "prod",
                pod: "shop-web",
                owner_uid: "u-1",
            },
            Sealed::LaunchSpec,
            sealed_spec,
        );
        serde_json::from_value(json!({
            "metadata": {
                "name": "shop-web", "namespace": "prod", "uid": "p-1",
                "labels": {LABEL_ROLE: ROLE_LAUNCHER},
                "annotations": {
                    ANNOTATION_LAUNCH_SPEC: spec,
                    Sealed::LaunchSpec.seal_key(): seal,
                },
                "ownerReferences": [{"apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
                    "name": "shop", "uid": "u-1", "controller": true}],
            },
            "spec": {
                "nodeName": "n1",
                "containers": [{"name": "launcher", "env": [{"name": "HVX_OWNER_UID", "value": "u-1"}]}],
            }
        }))
        .expect("pod")
    }

    #[test]
    fn volume_context_names_the_pod_and_tree() {
        let p = parse_volume_context(&context("store")).expect("parses");
        assert_eq!(
            p,
            PublishFor {
                namespace: "prod".into(),
                name: "shop-web".into(),
                uid: "p-1".into(),
                tree: Tree::Store,
            }
        );
        assert_eq!(
            parse_volume_context(&context("run")).expect("run").tree,
            Tree::Run
        );
        let err = parse_volume_context(&context("everything")).expect_err("bad tree");
        assert!(err.to_string().contains("\"store\" or \"run\""), "{err}");
        let mut no_pod = context("run");
        no_pod.remove(POD_UID_KEY);
        assert!(
            parse_volume_context(&no_pod)
                .expect_err("no pod info")
                .to_string()
                .contains("podInfoOnMount")
        );
        let mut persistent = context("run");
        persistent.remove(EPHEMERAL_KEY);
        assert!(parse_volume_context(&persistent).is_err());
    }

    #[test]
    fn only_the_sealed_launcher_pod_of_this_node_is_published() {
        let want = parse_volume_context(&context("run")).expect("parses");
        let spec = launch_spec("u-1/web");
        let ls = verify_launcher_pod(&pod(&spec, &spec), &want, "n1", Some(&key()))
            .expect("the operator's pod passes");
        assert_eq!(ls.vm_id, "u-1/web");

        let refusal = |p: &Pod, node: &str| {
            let e = verify_launcher_pod(p, &want, node, Some(&key())).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
            e.to_string()
        };
        // Another VM's spec in the annotation (the seal is for the real one).
        let other = launch_spec("u-9/db");
        assert!(refusal(&pod(&other, &spec), "n1").contains("not one hvx sealed"));
        // Bound elsewhere.
        assert!(refusal(&pod(&spec, &spec), "n2").contains("not bound to this node"));
        // A tenant's own pod with the labels but no seal.
        let mut forged = pod(&spec, &spec);
        forged
            .metadata
            .annotations
            .get_or_insert_default()
            .remove(Sealed::LaunchSpec.seal_key());
        assert!(refusal(&forged, "n1").contains("not one hvx sealed"));
        // Not a launcher.
        let mut plain = pod(&spec, &spec);
        plain.metadata.labels = None;
        assert!(refusal(&plain, "n1").contains(LABEL_ROLE));
        // A pod of the same name but another uid (deleted and made again).
        let mut replaced = pod(&spec, &spec);
        replaced.metadata.uid = Some("p-2".into());
        assert!(refusal(&replaced, "n1").contains("uid differs"));
        // Owned by something else.
        let mut orphan = pod(&spec, &spec);
        orphan.metadata.owner_references = None;
        assert!(refusal(&orphan, "n1").contains("controlled"));
        // An agent without the key accepts nothing.
        assert!(verify_launcher_pod(&pod(&spec, &spec), &want, "n1", None).is_err());
    }

    #[test]
    fn a_publish_mounts_exactly_the_vms_own_directories_at_their_node_paths() {
        let paths = NodePaths::new(Path::new("/var/lib/hvx"), Path::new("/run/hvx"), "n1");
        let ls: LaunchSpec = serde_json::from_str(&launch_spec("u-1/web")).expect("ls");
        let key = hvx_api::node::vm_key("u-1/web");
        let base = PathBuf::from("/var/lib/hvx/nodes/n1/store/bases/sha256-ab.qcow2");
        let store = plan(
            Tree::Store,
            &ls,
            &paths,
            Path::new("/var/lib/hvx"),
            Path::new("/run/hvx"),
            std::slice::from_ref(&base),
        )
        .expect("store plan");
        assert_eq!(
            store,
            vec![
                Bind {
                    source: base,
                    rel: "nodes/n1/store/bases/sha256-ab.qcow2".into(),
                    read_only: true,
                    file: true,
                },
                Bind {
                    source: format!("/var/lib/hvx/nodes/n1/store/disks/{key}").into(),
                    rel: format!("nodes/n1/store/disks/{key}").into(),
                    read_only: false,
                    file: false,
                },
            ]
        );
        let run = plan(
            Tree::Run,
            &ls,
            &paths,
            Path::new("/var/lib/hvx"),
            Path::new("/run/hvx"),
            &[],
        )
        .expect("run plan");
        let rels: Vec<_> = run.iter().map(|b| (b.rel.clone(), b.read_only)).collect();
        assert_eq!(
            rels,
            vec![
                (PathBuf::from("nodes/n1/launcher-api"), true),
                (PathBuf::from(format!("nodes/n1/vms/{key}")), false),
            ]
        );
        // A base outside the store is never mounted.
        assert!(
            plan(
                Tree::Store,
                &ls,
                &paths,
                Path::new("/var/lib/hvx"),
                Path::new("/run/hvx"),
                &[PathBuf::from("/etc/shadow")],
            )
            .is_err()
        );
    }

    #[test]
    fn the_kubelet_is_found_by_its_root_dir() {
        let cmd = |args: &[&str]| args.join("\0").into_bytes();
        let root = Path::new("/var/lib/kubelet");
        assert!(is_kubelet_of(
            &cmd(&["/usr/bin/kubelet", "--config", "c.yaml"]),
            root
        ));
        assert!(is_kubelet_of(
            &cmd(&["kubelet", "--root-dir=/var/lib/kubelet/"]),
            root
        ));
        let other = Path::new("/x/kubelets/n2");
        assert!(is_kubelet_of(
            &cmd(&["kubelet", "--root-dir", "/x/kubelets/n2"]),
            other
        ));
        assert!(!is_kubelet_of(
            &cmd(&["kubelet", "--root-dir", "/x/kubelets/n1"]),
            other
        ));
        assert!(!is_kubelet_of(&cmd(&["kubelet"]), other));
        assert!(!is_kubelet_of(&cmd(&["sh", "-c", "kubelet"]), root));
    }

    #[test]
    fn targets_are_kubelet_pod_volume_paths_only() {
        let root = Path::new("/var/lib/kubelet");
        assert!(
            check_target(
                "/var/lib/kubelet/pods/p-1/volumes/kubernetes.io~csi/run/mount",
                root
            )
            .is_ok()
        );
        for bad in [
            "/etc",
            "relative/pods/x",
            "/var/lib/kubelet/pods",
            "/var/lib/kubelet/pods/../../../etc",
            "/var/lib/kubeletx/pods/p/v",
        ] {
            assert!(check_target(bad, root).is_err(), "{bad}");
        }
    }
}
