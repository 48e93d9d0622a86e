//! The `NodeAgent` gRPC service: thin adapters from the contract to the modules
//! above, each call counted for /metrics.

use super::error::AgentError;
use super::{Agent, bases, disks, migration, moves, network, replica, uploads, vms};
use futures::Stream;
use hvx_proto::v1 as pb;
use hvx_proto::v1::node_agent_server::NodeAgent;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The service.
#[derive(Debug, Clone)]
pub struct AgentService {
    /// Shared state.
    pub agent: Arc<Agent>,
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl AgentService {
    fn done<T>(&self, method: &str, r: Result<T, AgentError>) -> Result<Response<T>, Status> {
        match r {
            Ok(v) => {
                self.agent.count(method, tonic::Code::Ok);
                Ok(Response::new(v))
            }
            Err(e) => {
                self.agent.count(method, e.code());
                tracing::warn!(method, error = %e, "call failed");
                Err(e.into())
            }
        }
    }
}

#[tonic::async_trait]
impl NodeAgent for AgentService {
    async fn get_capabilities(
        &self,
        _: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeCapabilities>, Status> {
        let a = &self.agent;
        let accel = a.accel.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut version = tokio::process::Command::new(hvx_vmm::argv::QEMU_BINARY);
        version.arg("--version");
        let qemu_version = hvx_child::output_tokio(version)
            .await
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_default();
        let space = a.store.space().await.unwrap_or_default();
        let caps = pb::NodeCapabilities {
            node_name: a.config.node_name.clone(),
            accelerator: accel
                .as_ref()
                .map_or("probing".into(), |r| r.accel.as_str().to_string()),
            accelerator_reason: accel.as_ref().map(|r| r.reason.clone()).unwrap_or_default(),
            cpu_model: accel
                .as_ref()
                .map(|r| r.cpu_model.clone())
                .unwrap_or_default(),
            qemu_version,
            vtep_ip: a.config.node_ip.to_string(),
            disk_store_free_bytes: space.filesystem_available,
            disk_store_used_bytes: space.bases_bytes + space.disks_bytes,
            running_vms: vms::list(a)
                .iter()
                .filter(|v| vms::live_qemu(&v.run_dir).is_some())
                .count() as u32,
            nic_models: ["vmxnet3", "e1000", "e1000e", "virtio"]
                .map(String::from)
                .to_vec(),
            disk_controllers: ["pvscsi", "lsilogic", "lsisas", "sata", "ide"]
                .map(String::from)
                .to_vec(),
            base_digests: a
                .store
                .bases()
                .map(|b| {
                    b.into_iter()
                        .map(|b| format!("sha256:{}", b.digest))
                        .collect()
                })
                .unwrap_or_default(),
            networks: network::persisted(a)
                .into_iter()
                .map(|r| pb::CarriedNetwork {
                    network_uid: r.network_uid,
                    vni: r.vni,
                })
                .collect(),
        };
        self.done("GetCapabilities", Ok(caps))
    }

    type PrepareDiskStream = Stream_<pb::DiskProgress>;

    async fn prepare_disk(
        &self,
        req: Request<pb::PrepareDiskRequest>,
    ) -> Result<Response<Self::PrepareDiskStream>, Status> {
        let mut rx = match disks::prepare(&self.agent, req.into_inner()) {
            Ok(rx) => rx,
            Err(e) => return self.done("PrepareDisk", Err(e)),
        };
        self.agent.count("PrepareDisk", tonic::Code::Ok);
        let stream = async_stream(move |tx| async move {
            loop {
                let msg = rx.borrow_and_update().clone();
                let last = disks::is_final(&msg);
                if tx.send(Ok(msg)).await.is_err() || last {
                    return;
                }
                if rx.changed().await.is_err() {
                    // The import task ended; its last message was already sent
                    // unless it ended between our borrow and here.
                    let msg = rx.borrow().clone();
                    if disks::is_final(&msg) {
                        let _ = tx.send(Ok(msg)).await;
                    }
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn ensure_overlay(
        &self,
        req: Request<pb::EnsureOverlayRequest>,
    ) -> Result<Response<pb::OverlayInfo>, Status> {
        let r = disks::ensure_overlay(&self.agent, &req.into_inner()).await;
        self.done("EnsureOverlay", r)
    }

    async fn delete_overlay(
        &self,
        req: Request<pb::DeleteOverlayRequest>,
    ) -> Result<Response<pb::DeleteOverlayResponse>, Status> {
        let r = disks::delete_overlay(&self.agent, &req.into_inner())
            .await
            .map(|()| pb::DeleteOverlayResponse {});
        self.done("DeleteOverlay", r)
    }

    async fn release_disk(
        &self,
        req: Request<pb::ReleaseDiskRequest>,
    ) -> Result<Response<pb::ReleaseDiskResponse>, Status> {
        let r = disks::release(&self.agent, &req.into_inner().disk_uid)
            .await
            .map(|base_removed| pb::ReleaseDiskResponse { base_removed });
        self.done("ReleaseDisk", r)
    }

    type ExportOverlayStream = Stream_<pb::OverlayChunk>;

    async fn export_overlay(
        &self,
        req: Request<pb::ExportOverlayRequest>,
    ) -> Result<Response<Self::ExportOverlayStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let r = moves::export(self.agent.clone(), req.into_inner(), tx)
            .await
            .map(|()| -> Self::ExportOverlayStream {
                Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
            });
        self.done("ExportOverlay", r)
    }

    async fn import_overlay(
        &self,
        req: Request<tonic::Streaming<pb::OverlayChunk>>,
    ) -> Result<Response<pb::OverlayInfo>, Status> {
        let r = moves::import(&self.agent, req.into_inner()).await;
        self.done("ImportOverlay", r)
    }

    async fn put_upload(
        &self,
        req: Request<tonic::Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadState>, Status> {
        let r = uploads::put(&self.agent, req.into_inner()).await;
        self.done("PutUpload", r)
    }

    async fn get_upload(
        &self,
        req: Request<pb::GetUploadRequest>,
    ) -> Result<Response<pb::UploadState>, Status> {
        let r = uploads::get(&self.agent, &req.into_inner().disk_uid).await;
        self.done("GetUpload", r)
    }

    type ExportBaseStream = Stream_<pb::BaseChunk>;

    async fn export_base(
        &self,
        req: Request<pb::ExportBaseRequest>,
    ) -> Result<Response<Self::ExportBaseStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let r = bases::export(self.agent.clone(), req.into_inner(), tx)
            .await
            .map(|()| -> Self::ExportBaseStream {
                Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
            });
        self.done("ExportBase", r)
    }

    async fn import_base(
        &self,
        req: Request<tonic::Streaming<pb::BaseChunk>>,
    ) -> Result<Response<pb::DiskProgress>, Status> {
        let r = bases::import(&self.agent, req.into_inner()).await;
        self.done("ImportBase", r)
    }

    async fn ensure_network(
        &self,
        req: Request<pb::EnsureNetworkRequest>,
    ) -> Result<Response<pb::NetworkState>, Status> {
        let r = network::ensure(&self.agent, req.into_inner()).await;
        self.done("EnsureNetwork", r)
    }

    async fn delete_network(
        &self,
        req: Request<pb::DeleteNetworkRequest>,
    ) -> Result<Response<pb::DeleteNetworkResponse>, Status> {
        let req = req.into_inner();
        let r = network::delete(&self.agent, req.vni, req.force)
            .await
            .map(|()| pb::DeleteNetworkResponse {});
        self.done("DeleteNetwork", r)
    }

    async fn get_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::VmState>, Status> {
        let r = vms::get(&self.agent, &req.into_inner().vm_uid);
        match r {
            Err(AgentError::Precondition(m)) => {
                self.agent.count("GetVm", tonic::Code::NotFound);
                Err(Status::not_found(m))
            }
            other => self.done("GetVm", other),
        }
    }

    async fn prepare_migration_target(
        &self,
        req: Request<pb::PrepareMigrationTargetRequest>,
    ) -> Result<Response<pb::MigrationEndpoint>, Status> {
        let r = migration::prepare_target(&self.agent, &req.into_inner()).await;
        self.done("PrepareMigrationTarget", r)
    }

    type StartMigrationStream = Stream_<pb::MigrationProgress>;

    async fn start_migration(
        &self,
        req: Request<pb::StartMigrationRequest>,
    ) -> Result<Response<Self::StartMigrationStream>, Status> {
        let rx = migration::start(self.agent.clone(), req.into_inner()).await;
        let stream = rx.map(|mut rx| {
            async_stream(move |tx| async move {
                loop {
                    let p = rx.borrow_and_update().clone();
                    let last = migration::is_final(&p);
                    if tx.send(Ok(p)).await.is_err() || last {
                        return;
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            })
        });
        self.done("StartMigration", stream)
    }

    async fn cancel_migration(
        &self,
        req: Request<pb::CancelMigrationRequest>,
    ) -> Result<Response<pb::CancelMigrationResponse>, Status> {
        let r = migration::cancel(&self.agent, &req.into_inner())
            .await
            .map(|outcome| pb::CancelMigrationResponse {
                outcome: outcome as i32,
            });
        self.done("CancelMigration", r)
    }

    async fn prepare_replica(
        &self,
        req: Request<pb::PrepareReplicaRequest>,
    ) -> Result<Response<pb::ReplicaEndpoint>, Status> {
        let r = replica::prepare(&self.agent, &req.into_inner()).await;
        self.done("PrepareReplica", r)
    }

    async fn stop_replica(
        &self,
        req: Request<pb::StopReplicaRequest>,
    ) -> Result<Response<pb::StopReplicaResponse>, Status> {
        let r = replica::stop(&self.agent, &req.into_inner())
            .await
            .map(|()| pb::StopReplicaResponse {});
        self.done("StopReplica", r)
    }

    async fn start_replication(
        &self,
        req: Request<pb::StartReplicationRequest>,
    ) -> Result<Response<pb::ReplicationStatus>, Status> {
        let r = replica::start_replication(&self.agent, &req.into_inner()).await;
        self.done("StartReplication", r)
    }

    async fn get_replication(
        &self,
        req: Request<pb::GetReplicationRequest>,
    ) -> Result<Response<pb::ReplicationStatus>, Status> {
        let r = replica::get_replication(&self.agent, &req.into_inner()).await;
        self.done("GetReplication", r)
    }

    async fn stop_replication(
        &self,
        req: Request<pb::StopReplicationRequest>,
    ) -> Result<Response<pb::StopReplicationResponse>, Status> {
        let r = replica::stop_replication(&self.agent, &req.into_inner())
            .await
            .map(|()| pb::StopReplicationResponse {});
        self.done("StopReplication", r)
    }
}

/// A stream fed by a task through a bounded channel (the task stops when the
/// client goes away: its sends fail).
fn async_stream<T, F, Fut>(body: F) -> Stream_<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
