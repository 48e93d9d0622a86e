//! `devices.hvx.dev/kvm`: the kubelet device plugin through which launcher pods get
//! `/dev/kvm` instead of being privileged.
//!
//! Every node advertises the same fixed number of units, KVM or not, so the scheduler
//! treats nodes alike (the accelerator is the `hvx.dev/accelerator` label's business);
//! what a unit brings is decided at Allocate: `/dev/kvm` where the agent's
//! accelerator probe found KVM usable, nothing where VMs run on TCG. The agent
//! registers only after the probe, so a node offers no units before it knows.
//!
//! Registration goes through the kubelet's plugin watcher (`<kubelet root>/plugins_registry/`,
//! plugin type `DevicePlugin`), like the CSI driver's, not through
//! `/var/lib/kubelet/device-plugins/kubelet.sock`: that path is fixed in the kubelet
//! whatever its `--root-dir`, so kubelets sharing a host (the local test harness) would
//! share it. The plugin watcher finds the registration socket again after a kubelet
//! restart; the agent re-creates its sockets if they vanish. DevicePlugin is served
//! on `<kubelet root>/plugins/devices.hvx.dev/kvm.sock`; both sockets go through the
//! authority shim (the registration client needs it, the device-plugin client of
//! current kubelets sends `localhost` and is passed unchanged).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use hvx_proto::deviceplugin as dp;
use hvx_proto::pluginregistration as reg;
use tokio_stream::Stream;

use super::error::AgentError;
use super::plugin_registration::PluginRegistration;

/// The extended resource launcher pods request.
pub const RESOURCE_NAME: &str = hvx_api::node::KVM_DEVICE_RESOURCE;
/// Units every node advertises: the kubelet's default pod limit, so the resource
/// never limits a node before its pod count does.
pub const UNITS: usize = 110;
/// The device-plugin API version the agent speaks.
const API_VERSION: &str = "v1beta1";
/// The plugin's directory below the kubelet root (its DevicePlugin socket).
const PLUGIN_DIR: &str = "plugins/devices.hvx.dev";
/// The DevicePlugin socket in it.
const PLUGIN_SOCKET: &str = "kvm.sock";
/// The registration socket in `<kubelet root>/plugins_registry/`.
const REGISTRATION_SOCKET: &str = "devices.hvx.dev-kvm-reg.sock";
/// The device a unit brings where KVM is usable.
const KVM_DEVICE: &str = "/dev/kvm";
/// Where the kernel offers userfaultfd to unprivileged processes.
pub const USERFAULTFD_DEVICE: &str = "/dev/userfaultfd";
/// How often the agent checks that its sockets are still the ones it serves.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);
/// Pause before serving again after a failure.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// The device IDs advertised: `kvm-0` .. `kvm-109`.
pub fn device_ids() -> Vec<String> {
    (0..UNITS).map(|i| format!("kvm-{i}")).collect()
}

fn is_device_id(id: &str) -> bool {
    id.strip_prefix("kvm-")
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n < UNITS && id == format!("kvm-{n}"))
}

/// The device nodes a unit brings on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeDevices {
    /// The accelerator probe found KVM usable: `/dev/kvm`. Otherwise VMs run on TCG.
    pub kvm: bool,
    /// The kernel has `/dev/userfaultfd` (5.11+): a post-copy migration target's QEMU
    /// needs userfaultfd, which an unprivileged process without CAP_SYS_PTRACE gets
    /// only through that device while `vm.unprivileged_userfaultfd` is 0.
    pub userfaultfd: bool,
}

fn rw_device(path: &str) -> dp::DeviceSpec {
    dp::DeviceSpec {
        container_path: path.into(),
        host_path: path.into(),
        permissions: "rw".into(),
    }
}

/// What each container of an Allocate gets: `/dev/kvm` (read-write, as QEMU opens
/// it) where KVM is usable here (else its VM runs on TCG), `/dev/userfaultfd` where
/// the kernel has it.
pub fn allocate(
    node: NodeDevices,
    req: &dp::AllocateRequest,
) -> Result<dp::AllocateResponse, AgentError> {
    let mut container_responses = Vec::with_capacity(req.container_requests.len());
    for container in &req.container_requests {
        if container.devices_ids.is_empty() {
            return Err(AgentError::Invalid(format!(
                "Allocate of {RESOURCE_NAME} with no device IDs"
            )));
        }
        if let Some(bad) = container.devices_ids.iter().find(|id| !is_device_id(id)) {
            return Err(AgentError::Invalid(format!(
                "Allocate of {RESOURCE_NAME} names {bad:?}, not a device this agent advertises"
            )));
        }
        let mut devices = Vec::new();
        if node.kvm {
            devices.push(rw_device(KVM_DEVICE));
        }
        if node.userfaultfd {
            devices.push(rw_device(USERFAULTFD_DEVICE));
        }
        container_responses.push(dp::ContainerAllocateResponse {
            devices,
            ..Default::default()
        });
    }
    Ok(dp::AllocateResponse {
        container_responses,
    })
}

/// The DevicePlugin service.
#[derive(Clone, Debug)]
pub struct KvmDevicePlugin {
    /// What a unit brings on this node.
    pub node: NodeDevices,
}

type DeviceListStream =
    Pin<Box<dyn Stream<Item = Result<dp::ListAndWatchResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl dp::device_plugin_server::DevicePlugin for KvmDevicePlugin {
    async fn get_device_plugin_options(
        &self,
        _: tonic::Request<dp::Empty>,
    ) -> Result<tonic::Response<dp::DevicePluginOptions>, tonic::Status> {
        Ok(tonic::Response::new(dp::DevicePluginOptions::default()))
    }

    type ListAndWatchStream = DeviceListStream;

    async fn list_and_watch(
        &self,
        _: tonic::Request<dp::Empty>,
    ) -> Result<tonic::Response<Self::ListAndWatchStream>, tonic::Status> {
        let devices = device_ids()
            .into_iter()
            .map(|id| dp::Device {
                id,
                health: "Healthy".into(),
            })
            .collect();
        // The list never changes; the stream stays open (the kubelet takes its end
        // as the plugin going away).
        let stream = tokio_stream::StreamExt::chain(
            tokio_stream::once(Ok(dp::ListAndWatchResponse { devices })),
            tokio_stream::pending(),
        );
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        _: tonic::Request<dp::PreferredAllocationRequest>,
    ) -> Result<tonic::Response<dp::PreferredAllocationResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "no preferred allocation (not advertised in the plugin options)",
        ))
    }

    async fn allocate(
        &self,
        req: tonic::Request<dp::AllocateRequest>,
    ) -> Result<tonic::Response<dp::AllocateResponse>, tonic::Status> {
        allocate(self.node, req.get_ref())
            .map(tonic::Response::new)
            .map_err(|e| tonic::Status::new(e.code(), e.to_string()))
    }

    async fn pre_start_container(
        &self,
        _: tonic::Request<dp::PreStartContainerRequest>,
    ) -> Result<tonic::Response<dp::PreStartContainerResponse>, tonic::Status> {
        Ok(tonic::Response::new(dp::PreStartContainerResponse {}))
    }
}

/// A socket file's identity (device, inode): a recreated socket has a new one.
fn socket_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The plugin's socket and its registration socket below a kubelet root dir.
fn socket_paths(kubelet_root: &Path) -> (PathBuf, PathBuf) {
    (
        kubelet_root.join(PLUGIN_DIR).join(PLUGIN_SOCKET),
        kubelet_root
            .join("plugins_registry")
            .join(REGISTRATION_SOCKET),
    )
}

fn listen(path: &Path) -> Result<tokio::net::UnixListener, AgentError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(AgentError::io(format!("create {}", dir.display())))?;
    }
    let _ = std::fs::remove_file(path);
    tokio::net::UnixListener::bind(path)
        .map_err(AgentError::io(format!("listen on {}", path.display())))
}

type ServerTask = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// Aborts the servers when dropped (they are replaced).
struct AbortOnDrop(Vec<ServerTask>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Serves the plugin and its registration below `kubelet_mount` (the kubelet root as
/// mounted here; `kubelet_root` is its path on the host, which the kubelet dials).
/// Returns Ok when a socket vanished or was replaced (serve again), Err when serving
/// failed.
async fn serve_once(
    kubelet_root: &Path,
    kubelet_mount: &Path,
    node: NodeDevices,
) -> Result<(), AgentError> {
    let (endpoint, _) = socket_paths(kubelet_root);
    let (local_endpoint, registration) = socket_paths(kubelet_mount);
    let plugin_listener = listen(&local_endpoint)?;
    let plugin = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(dp::device_plugin_server::DevicePluginServer::new(
                KvmDevicePlugin { node },
            ))
            .serve_with_incoming(super::authority_shim::incoming(plugin_listener)),
    );
    // The registration socket last: the kubelet dials the plugin right away.
    let registration_listener = listen(&registration)?;
    let registrar = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(reg::registration_server::RegistrationServer::new(
                PluginRegistration {
                    kind: "DevicePlugin",
                    name: RESOURCE_NAME,
                    endpoint,
                    versions: &[API_VERSION],
                },
            ))
            .serve_with_incoming(super::authority_shim::incoming(registration_listener)),
    );
    let servers = AbortOnDrop(vec![plugin, registrar]);
    let ids = (
        socket_identity(&local_endpoint),
        socket_identity(&registration),
    );
    tracing::info!(
        resource = RESOURCE_NAME,
        units = UNITS,
        kvm = node.kvm,
        userfaultfd = node.userfaultfd,
        "device plugin serving, waiting for the kubelet's plugin watcher"
    );
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        if servers.0.iter().any(|t| t.is_finished()) {
            return Err(AgentError::Host(format!(
                "the {RESOURCE_NAME} device plugin server stopped"
            )));
        }
        let now = (
            socket_identity(&local_endpoint),
            socket_identity(&registration),
        );
        if now != ids {
            tracing::info!(
                resource = RESOURCE_NAME,
                "a device plugin socket vanished or was replaced: serving again"
            );
            return Ok(());
        }
    }
}

/// Runs the `devices.hvx.dev/kvm` plugin for the kubelet whose root dir is
/// `kubelet_root` on the host and `kubelet_mount` here, for as long as the task lives.
pub async fn run(kubelet_root: PathBuf, kubelet_mount: PathBuf, node: NodeDevices) {
    let mut last_error = String::new();
    loop {
        match serve_once(&kubelet_root, &kubelet_mount, node).await {
            Ok(()) => last_error.clear(),
            Err(e) => {
                // Once per distinct failure, not every retry.
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!(error = %text, "device plugin {RESOURCE_NAME}: retrying");
                    last_error = text;
                }
                tokio::time::sleep(RETRY_INTERVAL).await;
            }
        }
    }
}

/// Removes the plugin's sockets (agent shutdown): the kubelet deregisters it when
/// its registration socket goes, instead of calling a dead one.
pub fn remove_sockets(kubelet_mount: &Path) {
    let (endpoint, registration) = socket_paths(kubelet_mount);
    let _ = std::fs::remove_file(registration);
    let _ = std::fs::remove_file(endpoint);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(containers: &[&[&str]]) -> dp::AllocateRequest {
        dp::AllocateRequest {
            container_requests: containers
                .iter()
                .map(|ids| dp::ContainerAllocateRequest {
                    devices_ids: ids.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn kvm_nodes_give_dev_kvm_to_each_container_tcg_nodes_nothing() {
        let req = request(&[&["kvm-0"], &["kvm-7", "kvm-109"]]);
        let node = |kvm, userfaultfd| NodeDevices { kvm, userfaultfd };
        let kvm = allocate(node(true, false), &req).expect("allocate");
        assert_eq!(kvm.container_responses.len(), 2);
        for c in &kvm.container_responses {
            assert_eq!(
                c.devices,
                vec![dp::DeviceSpec {
                    container_path: "/dev/kvm".into(),
                    host_path: "/dev/kvm".into(),
                    permissions: "rw".into(),
                }]
            );
            assert!(c.mounts.is_empty() && c.envs.is_empty());
        }
        let tcg = allocate(node(false, false), &req).expect("allocate");
        assert_eq!(tcg.container_responses.len(), 2);
        assert!(tcg.container_responses.iter().all(|c| c.devices.is_empty()));
        // Post-copy targets: userfaultfd wherever the kernel offers the device.
        let uffd = allocate(node(false, true), &req).expect("allocate");
        for c in &uffd.container_responses {
            let paths: Vec<&str> = c.devices.iter().map(|d| d.host_path.as_str()).collect();
            assert_eq!(paths, ["/dev/userfaultfd"]);
        }
        let both = allocate(node(true, true), &req).expect("allocate");
        let paths: Vec<&str> = both.container_responses[0]
            .devices
            .iter()
            .map(|d| d.container_path.as_str())
            .collect();
        assert_eq!(paths, ["/dev/kvm", "/dev/userfaultfd"]);
    }

    #[test]
    fn unknown_or_missing_device_ids_are_refused() {
        for ids in [
            &["kvm-110"][..],
            &["kvm-01"],
            &["gpu-0"],
            &["kvm-"],
            &["kvm-0", "kvm--1"],
            &[],
        ] {
            let got = allocate(
                NodeDevices {
                    kvm: true,
                    userfaultfd: true,
                },
                &request(&[ids]),
            );
            assert!(
                matches!(got, Err(AgentError::Invalid(_))),
                "{ids:?}: {got:?}"
            );
        }
        let node = NodeDevices {
            kvm: true,
            userfaultfd: true,
        };
        let none = allocate(node, &request(&[])).expect("no containers");
        assert!(none.container_responses.is_empty());
    }

    #[test]
    fn every_node_advertises_the_same_distinct_units() {
        let ids = device_ids();
        assert_eq!(ids.len(), UNITS);
        let unique: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), UNITS);
        assert!(ids.iter().all(|id| is_device_id(id)));
    }

    async fn unix_channel(path: PathBuf) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }))
            .await
            .expect("connect")
    }

    /// What the kubelet's plugin watcher learns from the registration socket, once it
    /// is there.
    async fn get_info(registration: &Path) -> reg::PluginInfo {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !registration.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "registration socket"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let channel = unix_channel(registration.to_path_buf()).await;
        reg::registration_client::RegistrationClient::new(channel)
            .get_info(reg::InfoRequest {})
            .await
            .expect("GetInfo")
            .into_inner()
    }

    #[tokio::test]
    async fn the_plugin_watcher_finds_the_plugin_which_serves_and_comes_back_when_its_sockets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (root, mount) = (PathBuf::from("/var/lib/kubelet"), dir.path().to_path_buf());
        let plugin = tokio::spawn(run(
            root,
            mount.clone(),
            NodeDevices {
                kvm: false,
                userfaultfd: false,
            },
        ));
        let (endpoint, registration) = socket_paths(&mount);

        let info = get_info(&registration).await;
        assert_eq!(info.r#type, "DevicePlugin");
        assert_eq!(info.name, RESOURCE_NAME);
        assert_eq!(
            info.endpoint,
            "/var/lib/kubelet/plugins/devices.hvx.dev/kvm.sock"
        );
        assert_eq!(info.supported_versions, vec!["v1beta1".to_string()]);

        let mut client =
            dp::device_plugin_client::DevicePluginClient::new(unix_channel(endpoint.clone()).await);
        let mut list = client
            .list_and_watch(dp::Empty {})
            .await
            .expect("ListAndWatch")
            .into_inner();
        let devices = list.message().await.expect("stream").expect("a list");
        assert_eq!(devices.devices.len(), UNITS);
        assert!(devices.devices.iter().all(|d| d.health == "Healthy"));
        let got = client
            .allocate(request(&[&["kvm-3"]]))
            .await
            .expect("Allocate")
            .into_inner();
        assert_eq!(got.container_responses.len(), 1);
        assert!(
            got.container_responses[0].devices.is_empty(),
            "TCG node: no /dev/kvm"
        );
        let refused = client.allocate(request(&[&["kvm-999"]])).await;
        assert_eq!(
            refused.expect_err("unknown id").code(),
            tonic::Code::InvalidArgument
        );

        // Its sockets removed (someone cleaned the directories): served again.
        std::fs::remove_file(&registration).expect("rm");
        std::fs::remove_file(&endpoint).expect("rm");
        let again = get_info(&registration).await;
        assert_eq!(again.name, RESOURCE_NAME);
        let mut client =
            dp::device_plugin_client::DevicePluginClient::new(unix_channel(endpoint).await);
        let options = client
            .get_device_plugin_options(dp::Empty {})
            .await
            .expect("options")
            .into_inner();
        assert!(!options.pre_start_required);
        plugin.abort();
    }
}
