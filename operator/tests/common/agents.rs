//! Fake node agents: the real gRPC contract served on loopback, node n1 at 127.0.0.1
//! and n2 at 127.0.0.2 on one port (the operator dials every node on the same port, by
//! its address). Each records the calls it gets as "Rpc detail".
//!
//! What they do: GetCapabilities carries the networks given; PrepareDisk has the base
//! at once ([`BASE_DIGEST`]); ExportOverlay serves [`overlay_bytes`] but the first
//! export of a run stalls after one chunk (the relaying operator dies meanwhile);
//! ImportOverlay installs only a complete stream whose trailer matches, as the real
//! agent; PrepareMigrationTarget answers an endpoint on n2's address; CancelMigration
//! says the migration never started there; ExportBase has no base (the operator falls
//! back to PrepareDisk); the rest answer Ok where a cleanup or a start calls them.

use hvx_proto::v1 as pb;
use hvx_proto::v1::node_agent_server::{NodeAgent, NodeAgentServer};
use pb::overlay_chunk::Part;
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The digest every fake base has.
pub const BASE_DIGEST: &str =
    "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// One agent's calls, as "Rpc detail".
pub type Calls = Arc<Mutex<Vec<String>>>;

/// What the overlay relays saw, across both agents.
#[derive(Debug, Default)]
pub struct Moves {
    /// Imports on a target: (move id, installed?).
    pub imports: Vec<(String, bool)>,
    /// Data chunks received by imports.
    pub chunks_received: usize,
    /// Exports served so far.
    pub exports: usize,
}

/// The two fake agents of a test.
#[derive(Clone, Debug)]
pub struct FakeAgents {
    /// The port both listen on.
    pub port: u16,
    /// n1's calls.
    pub n1: Calls,
    /// n2's calls.
    pub n2: Calls,
    /// Overlay relays through either.
    pub moves: Arc<Mutex<Moves>>,
}

/// A snapshot of `calls`.
pub fn calls(c: &Calls) -> Vec<String> {
    c.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The overlay file an old node holds for a VM's disk (what a stopped VM wrote).
pub fn overlay_bytes() -> Vec<u8> {
    (0..300_000u32).map(|i| (i % 251) as u8).collect()
}

/// Hex sha256, as trailers carry it.
pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Serves n1 and n2; n2 carries `n2_networks` (uid, VNI).
pub async fn fake_agents(n2_networks: Vec<(String, u32)>) -> FakeAgents {
    for _ in 0..50 {
        let first = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = first.local_addr().expect("addr").port();
        let Ok(second) = tokio::net::TcpListener::bind(("127.0.0.2", port)).await else {
            continue;
        };
        let agents = FakeAgents {
            port,
            n1: Calls::default(),
            n2: Calls::default(),
            moves: Arc::default(),
        };
        for (listener, calls, networks) in [
            (first, agents.n1.clone(), vec![]),
            (second, agents.n2.clone(), n2_networks.clone()),
        ] {
            let agent = FakeAgent {
                calls,
                networks,
                moves: agents.moves.clone(),
            };
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(NodeAgentServer::new(agent))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
        }
        return agents;
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

struct FakeAgent {
    calls: Calls,
    networks: Vec<(String, u32)>,
    moves: Arc<Mutex<Moves>>,
}

impl FakeAgent {
    fn record(&self, call: String) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call);
    }

    fn moves(&self) -> std::sync::MutexGuard<'_, Moves> {
        self.moves.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn chunk(part: Part) -> Result<pb::OverlayChunk, Status> {
    Ok(pb::OverlayChunk { part: Some(part) })
}

fn unused<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not used by these tests"))
}

#[tonic::async_trait]
impl NodeAgent for FakeAgent {
    async fn get_capabilities(
        &self,
        _: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeCapabilities>, Status> {
        self.record("GetCapabilities".into());
        let networks = self
            .networks
            .iter()
            .map(|(uid, vni)| pb::CarriedNetwork {
                network_uid: uid.clone(),
                vni: *vni,
            })
            .collect();
        Ok(Response::new(pb::NodeCapabilities {
            networks,
            ..Default::default()
        }))
    }

    type PrepareDiskStream = Boxed<pb::DiskProgress>;
    async fn prepare_disk(
        &self,
        r: Request<pb::PrepareDiskRequest>,
    ) -> Result<Response<Self::PrepareDiskStream>, Status> {
        self.record(format!("PrepareDisk {}", r.into_inner().disk_uid));
        let done = pb::DiskProgress {
            phase: pb::disk_progress::Phase::Ready as i32,
            digest: BASE_DIGEST.into(),
            virtual_bytes: 1 << 30,
            ..Default::default()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(done)]))))
    }

    async fn ensure_overlay(
        &self,
        r: Request<pb::EnsureOverlayRequest>,
    ) -> Result<Response<pb::OverlayInfo>, Status> {
        let r = r.into_inner();
        self.record(format!(
            "EnsureOverlay {} {} {}",
            r.vm_uid, r.disk_name, r.base_digest
        ));
        Ok(Response::new(pb::OverlayInfo::default()))
    }

    async fn delete_overlay(
        &self,
        r: Request<pb::DeleteOverlayRequest>,
    ) -> Result<Response<pb::DeleteOverlayResponse>, Status> {
        let r = r.into_inner();
        self.record(format!("DeleteOverlay {} {}", r.vm_uid, r.disk_name));
        Ok(Response::new(pb::DeleteOverlayResponse {}))
    }

    async fn release_disk(
        &self,
        r: Request<pb::ReleaseDiskRequest>,
    ) -> Result<Response<pb::ReleaseDiskResponse>, Status> {
        self.record(format!("ReleaseDisk {}", r.into_inner().disk_uid));
        Ok(Response::new(pb::ReleaseDiskResponse {
            base_removed: true,
        }))
    }

    type ExportOverlayStream = Boxed<pb::OverlayChunk>;
    async fn export_overlay(
        &self,
        r: Request<pb::ExportOverlayRequest>,
    ) -> Result<Response<Self::ExportOverlayStream>, Status> {
        let r = r.into_inner();
        self.record(format!("ExportOverlay {} {}", r.vm_uid, r.disk_name));
        let first = {
            let mut moves = self.moves();
            moves.exports += 1;
            moves.exports == 1
        };
        let bytes = overlay_bytes();
        let header = pb::OverlayHeader {
            vm_uid: r.vm_uid,
            disk_name: r.disk_name,
            base_digest: BASE_DIGEST.into(),
            chain_json: b"{}".to_vec(),
            files: vec![pb::OverlayFile {
                name: "l1.qcow2".into(),
                size: bytes.len() as u64,
            }],
            move_id: String::new(),
        };
        let (head, tail) = bytes.split_at(100_000);
        let mut parts = vec![
            chunk(Part::Header(header)),
            chunk(Part::Data(pb::OverlayData {
                file: 0,
                offset: 0,
                bytes: head.to_vec(),
            })),
        ];
        if first {
            let stalled = tokio_stream::StreamExt::chain(
                tokio_stream::iter(parts),
                futures::stream::pending(),
            );
            return Ok(Response::new(Box::pin(stalled)));
        }
        parts.push(chunk(Part::Data(pb::OverlayData {
            file: 0,
            offset: head.len() as u64,
            bytes: tail.to_vec(),
        })));
        parts.push(chunk(Part::Trailer(pb::OverlayTrailer {
            sha256: vec![hex_sha256(&bytes)],
        })));
        Ok(Response::new(Box::pin(tokio_stream::iter(parts))))
    }

    async fn import_overlay(
        &self,
        r: Request<tonic::Streaming<pb::OverlayChunk>>,
    ) -> Result<Response<pb::OverlayInfo>, Status> {
        let mut stream = r.into_inner();
        let (mut move_id, mut file, mut installed) = (String::new(), Vec::new(), false);
        // A stream that breaks or ends without a trailer installs nothing.
        while let Ok(Some(msg)) = stream.message().await {
            match msg.part {
                Some(Part::Header(h)) => move_id = h.move_id,
                Some(Part::Data(d)) => {
                    if d.offset != file.len() as u64 {
                        return Err(Status::invalid_argument("a gap in the stream"));
                    }
                    file.extend_from_slice(&d.bytes);
                    self.moves().chunks_received += 1;
                }
                Some(Part::Trailer(t)) => {
                    installed = t.sha256 == vec![hex_sha256(&file)];
                    break;
                }
                None => {}
            }
        }
        self.record(format!("ImportOverlay {move_id}"));
        self.moves().imports.push((move_id, installed));
        if installed {
            Ok(Response::new(pb::OverlayInfo::default()))
        } else {
            Err(Status::aborted("the stream ended before its trailer"))
        }
    }

    async fn ensure_network(
        &self,
        r: Request<pb::EnsureNetworkRequest>,
    ) -> Result<Response<pb::NetworkState>, Status> {
        self.record(format!("EnsureNetwork {}", r.into_inner().vni));
        Ok(Response::new(pb::NetworkState::default()))
    }

    async fn delete_network(
        &self,
        r: Request<pb::DeleteNetworkRequest>,
    ) -> Result<Response<pb::DeleteNetworkResponse>, Status> {
        let r = r.into_inner();
        self.record(format!("DeleteNetwork {} {}", r.network_uid, r.vni));
        Ok(Response::new(pb::DeleteNetworkResponse {}))
    }

    async fn get_vm(&self, _: Request<pb::VmRef>) -> Result<Response<pb::VmState>, Status> {
        unused()
    }

    async fn prepare_migration_target(
        &self,
        r: Request<pb::PrepareMigrationTargetRequest>,
    ) -> Result<Response<pb::MigrationEndpoint>, Status> {
        self.record(format!(
            "PrepareMigrationTarget {}",
            r.into_inner().migration_uid
        ));
        Ok(Response::new(pb::MigrationEndpoint {
            host: "127.0.0.2".into(),
            migration_port: 4444,
            nbd_port: 4445,
        }))
    }

    type StartMigrationStream = Boxed<pb::MigrationProgress>;
    async fn start_migration(
        &self,
        _: Request<pb::StartMigrationRequest>,
    ) -> Result<Response<Self::StartMigrationStream>, Status> {
        unused()
    }

    /// A migration that never started on this node (the source never got StartMigration).
    async fn cancel_migration(
        &self,
        r: Request<pb::CancelMigrationRequest>,
    ) -> Result<Response<pb::CancelMigrationResponse>, Status> {
        self.record(format!("CancelMigration {}", r.into_inner().migration_uid));
        Ok(Response::new(pb::CancelMigrationResponse {
            outcome: pb::cancel_migration_response::Outcome::Unspecified as i32,
        }))
    }

    async fn prepare_replica(
        &self,
        _: Request<pb::PrepareReplicaRequest>,
    ) -> Result<Response<pb::ReplicaEndpoint>, Status> {
        unused()
    }

    async fn stop_replica(
        &self,
        _: Request<pb::StopReplicaRequest>,
    ) -> Result<Response<pb::StopReplicaResponse>, Status> {
        unused()
    }

    async fn start_replication(
        &self,
        _: Request<pb::StartReplicationRequest>,
    ) -> Result<Response<pb::ReplicationStatus>, Status> {
        unused()
    }

    async fn get_replication(
        &self,
        _: Request<pb::GetReplicationRequest>,
    ) -> Result<Response<pb::ReplicationStatus>, Status> {
        unused()
    }

    async fn stop_replication(
        &self,
        _: Request<pb::StopReplicationRequest>,
    ) -> Result<Response<pb::StopReplicationResponse>, Status> {
        unused()
    }

    async fn put_upload(
        &self,
        _: Request<tonic::Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadState>, Status> {
        unused()
    }

    async fn get_upload(
        &self,
        _: Request<pb::GetUploadRequest>,
    ) -> Result<Response<pb::UploadState>, Status> {
        unused()
    }

    // No fake node holds a base another asks for: the operator falls back to the
    // source (PrepareDisk), as with a base released meanwhile.
    type ExportBaseStream = Boxed<pb::BaseChunk>;
    async fn export_base(
        &self,
        req: Request<pb::ExportBaseRequest>,
    ) -> Result<Response<Self::ExportBaseStream>, Status> {
        Err(Status::failed_precondition(format!(
            "base {} is not on this node",
            req.into_inner().digest
        )))
    }

    async fn import_base(
        &self,
        _: Request<tonic::Streaming<pb::BaseChunk>>,
    ) -> Result<Response<pb::DiskProgress>, Status> {
        unused()
    }
}
