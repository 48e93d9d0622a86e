//! `devices.hvx.dev/kvm`: the kubelet device plugin through which launcher pods get
//! `/dev/kvm` instead of being privileged.
//!
//! Every node advertises the same fixed number of units, KVM or not, so the scheduler
//! treats nodes alike (the accelerator is the `hvx.dev/accelerator` label's business);
//! what a unit brings is decided at Allocate: `/dev/kvm` where the agent's
//! accelerator probe found KVM usable, nothing where VMs run on TCG. The agent
//! registers only after the probe, so a node offers no units before it knows.
//!
//! The kubelet serves Registration on `<device-plugins>/kubelet.sock`; the agent
//! serves DevicePlugin on `<device-plugins>/hvx-kvm.sock` (through the authority
//! shim, harmless for kubelets that already send `localhost`). A kubelet restart
//! wipes that directory and makes a new `kubelet.sock`: the agent notices either and
//! serves and registers again.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use hvx_proto::deviceplugin as dp;
use tokio_stream::Stream;

use super::error::AgentError;

/// The extended resource launcher pods request.
pub const RESOURCE_NAME: &str = hvx_api::node::KVM_DEVICE_RESOURCE;
/// Units every node advertises: the kubelet's default pod limit, so the resource
/// never limits a node before its pod count does.
pub const UNITS: usize = 110;
/// The device-plugin API version the agent speaks.
const API_VERSION: &str = "v1beta1";
/// The agent's DevicePlugin socket, in the kubelet's device-plugins directory.
pub const PLUGIN_SOCKET: &str = "hvx-kvm.sock";
/// The kubelet's Registration socket there.
const KUBELET_SOCKET: &str = "kubelet.sock";
/// The device a unit brings where KVM is usable.
const KVM_DEVICE: &str = "/dev/kvm";
/// How often the agent checks that the kubelet and its own socket are the ones it
/// registered with.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);
/// Pause before serving again after a failure (no kubelet yet, register refused).
const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on one Register call.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// The device IDs advertised: `kvm-0` .. `kvm-109`.
pub fn device_ids() -> Vec<String> {
    (0..UNITS).map(|i| format!("kvm-{i}")).collect()
}

fn is_device_id(id: &str) -> bool {
    id.strip_prefix("kvm-")
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n < UNITS && id == format!("kvm-{n}"))
}

/// What each container of an Allocate gets: `/dev/kvm` (read-write, as QEMU opens
/// it) where KVM is usable here, otherwise no device (its VM runs on TCG).
pub fn allocate(
    kvm_usable: bool,
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
        let devices = if kvm_usable {
            vec![dp::DeviceSpec {
                container_path: KVM_DEVICE.into(),
                host_path: KVM_DEVICE.into(),
                permissions: "rw".into(),
            }]
        } else {
            Vec::new()
        };
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
    /// Whether the accelerator probe found KVM usable on this node.
    pub kvm_usable: bool,
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
        allocate(self.kvm_usable, req.get_ref())
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

/// Aborts a task when dropped (the plugin's server when it must be replaced).
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), tonic::transport::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Registers the plugin with the kubelet listening on `kubelet_socket`.
async fn register(kubelet_socket: &Path) -> Result<(), AgentError> {
    let path = kubelet_socket.to_path_buf();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            tokio::net::UnixStream::connect(path)
                .await
                .map(hyper_util::rt::TokioIo::new)
        }
    });
    let call = async {
        // The URI is a placeholder: the connector decides where to go.
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(connector)
            .await
            .map_err(|e| AgentError::Precondition(format!("connecting to the kubelet: {e}")))?;
        dp::registration_client::RegistrationClient::new(channel)
            .register(dp::RegisterRequest {
                version: API_VERSION.into(),
                endpoint: PLUGIN_SOCKET.into(),
                resource_name: RESOURCE_NAME.into(),
                options: Some(dp::DevicePluginOptions::default()),
            })
            .await
            .map_err(|s| {
                AgentError::Precondition(format!("the kubelet refused {RESOURCE_NAME}: {s}"))
            })
    };
    tokio::time::timeout(REGISTER_TIMEOUT, call)
        .await
        .map_err(|_| AgentError::Retry("the kubelet did not answer Register".into()))?
        .map(drop)
}

/// Serves the plugin in `dir` (the kubelet's device-plugins directory, as mounted
/// here) and registers it; returns Ok when the kubelet or the plugin's socket was
/// replaced since (serve and register again), Err when either step failed.
async fn serve_once(dir: &Path, kvm_usable: bool) -> Result<(), AgentError> {
    let kubelet = dir.join(KUBELET_SOCKET);
    let kubelet_id = socket_identity(&kubelet).ok_or_else(|| {
        AgentError::Precondition(format!("no kubelet socket {} yet", kubelet.display()))
    })?;
    let own = dir.join(PLUGIN_SOCKET);
    let _ = std::fs::remove_file(&own);
    let listener = tokio::net::UnixListener::bind(&own)
        .map_err(AgentError::io(format!("listen on {}", own.display())))?;
    let own_id = socket_identity(&own);
    let server = AbortOnDrop(tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(dp::device_plugin_server::DevicePluginServer::new(
                KvmDevicePlugin { kvm_usable },
            ))
            .serve_with_incoming(super::authority_shim::incoming(listener)),
    ));
    register(&kubelet).await?;
    tracing::info!(
        resource = RESOURCE_NAME,
        units = UNITS,
        kvm = kvm_usable,
        "device plugin registered with the kubelet"
    );
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        if server.0.is_finished() {
            return Err(AgentError::Host(format!(
                "the {RESOURCE_NAME} device plugin server stopped"
            )));
        }
        if socket_identity(&kubelet) != Some(kubelet_id) || socket_identity(&own) != own_id {
            tracing::info!(
                resource = RESOURCE_NAME,
                "kubelet restarted (its socket or the plugin's changed): registering again"
            );
            return Ok(());
        }
    }
}

/// Runs the `devices.hvx.dev/kvm` plugin in the kubelet's device-plugins directory
/// `dir` for as long as the task lives.
pub async fn run(dir: PathBuf, kvm_usable: bool) {
    let mut last_error = String::new();
    loop {
        match serve_once(&dir, kvm_usable).await {
            Ok(()) => last_error.clear(),
            Err(e) => {
                // Once per distinct failure: a kubelet that is down for a while would
                // otherwise fill the log.
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

/// Removes the plugin's socket (agent shutdown): the kubelet drops the resource's
/// endpoint instead of calling a dead one.
pub fn remove_socket(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(PLUGIN_SOCKET));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

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
        let kvm = allocate(true, &req).expect("allocate");
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
        let tcg = allocate(false, &req).expect("allocate");
        assert_eq!(tcg.container_responses.len(), 2);
        assert!(tcg.container_responses.iter().all(|c| c.devices.is_empty()));
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
            let got = allocate(true, &request(&[ids]));
            assert!(
                matches!(got, Err(AgentError::Invalid(_))),
                "{ids:?}: {got:?}"
            );
        }
        let none = allocate(true, &request(&[])).expect("no containers");
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

    /// A kubelet's Registration service that reports each Register.
    #[derive(Clone)]
    struct FakeKubelet(mpsc::UnboundedSender<dp::RegisterRequest>);

    #[tonic::async_trait]
    impl dp::registration_server::Registration for FakeKubelet {
        async fn register(
            &self,
            req: tonic::Request<dp::RegisterRequest>,
        ) -> Result<tonic::Response<dp::Empty>, tonic::Status> {
            let _ = self.0.send(req.into_inner());
            Ok(tonic::Response::new(dp::Empty {}))
        }
    }

    fn start_kubelet(
        dir: &Path,
        tx: mpsc::UnboundedSender<dp::RegisterRequest>,
    ) -> tokio::task::JoinHandle<()> {
        let sock = dir.join(KUBELET_SOCKET);
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind kubelet.sock");
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(dp::registration_server::RegistrationServer::new(
                    FakeKubelet(tx),
                ))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await;
        })
    }

    async fn next_register(
        rx: &mut mpsc::UnboundedReceiver<dp::RegisterRequest>,
    ) -> dp::RegisterRequest {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("registered in time")
            .expect("kubelet running")
    }

    async fn plugin_client(
        dir: &Path,
    ) -> dp::device_plugin_client::DevicePluginClient<tonic::transport::Channel> {
        let path = dir.join(PLUGIN_SOCKET);
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }))
            .await
            .expect("connect to the plugin");
        dp::device_plugin_client::DevicePluginClient::new(channel)
    }

    #[tokio::test]
    async fn registers_serves_and_registers_again_after_a_kubelet_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let kubelet = start_kubelet(dir.path(), tx.clone());
        let plugin = tokio::spawn(run(dir.path().to_path_buf(), false));

        let first = next_register(&mut rx).await;
        assert_eq!(first.version, "v1beta1");
        assert_eq!(first.resource_name, RESOURCE_NAME);
        assert_eq!(first.endpoint, PLUGIN_SOCKET);

        let mut client = plugin_client(dir.path()).await;
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

        // A kubelet restart: it wipes the directory and listens on a new socket.
        kubelet.abort();
        let _ = std::fs::remove_file(dir.path().join(PLUGIN_SOCKET));
        let _ = std::fs::remove_file(dir.path().join(KUBELET_SOCKET));
        let _kubelet = start_kubelet(dir.path(), tx);
        let again = next_register(&mut rx).await;
        assert_eq!(again.resource_name, RESOURCE_NAME);
        assert!(dir.path().join(PLUGIN_SOCKET).exists(), "serving again");
        plugin.abort();
    }
}
