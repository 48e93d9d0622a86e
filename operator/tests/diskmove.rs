//! Cold disk moves across an operator restart, against a mocked API server and two
//! fake node agents serving the real gRPC contract on loopback.
//!
//! The operator that starts a move is killed (its runtime dropped: every task and
//! connection of it ends, as when its pod dies) while the relay is half way. A new
//! operator, with nothing in memory, must resume from what the pod says
//! (`hvx.dev/disks-on`), move the disk again under the same move id (the pod's uid, which
//! makes ImportOverlay idempotent), record the outcome on the pod with its seal, and
//! never touch the old copy before the VM runs.

use http::{Method, Request, Response};
use hvx_api::launch::LaunchSpec;
use hvx_api::seal::{SealKey, Sealed, Subject};
use hvx_api::{OverlayDisk, VmApplication};
use hvx_operator::context::{Context, OperatorConfig};
use hvx_operator::hostplan::Cluster;
use hvx_operator::hostprep::DisksState;
use hvx_operator::stores::Stores;
use hvx_proto::v1 as pb;
use hvx_proto::v1::node_agent_server::{NodeAgent, NodeAgentServer};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use pb::overlay_chunk::Part;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::Stream;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};
use tower_test::mock;

const BASE_DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const POD_UID: &str = "p-db";

fn store_of<K>(objs: Vec<K>) -> reflector::Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let mut w: Writer<K> = Writer::default();
    w.apply_watcher_event(&watcher::Event::Init);
    for o in objs {
        w.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    w.apply_watcher_event(&watcher::Event::InitDone);
    w.as_reader()
}

fn seal_key() -> SealKey {
    SealKey::new(b"diskmove-tests-key-0123456789abcdef")
}

/// The overlay file the old node holds for the VM's disk (what a stopped VM wrote).
fn overlay_bytes() -> Vec<u8> {
    (0..300_000u32).map(|i| (i % 251) as u8).collect()
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the fake agents saw, shared with the test.
#[derive(Debug, Default)]
struct Seen {
    /// (node, RPC name, detail)
    calls: Vec<(String, &'static str, String)>,
    /// Imports on the target: (move id, installed?)
    imports: Vec<(String, bool)>,
    /// Data chunks the target received (all imports).
    chunks_received: usize,
}

type Shared = Arc<Mutex<Seen>>;
type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A node agent that serves what a cold move asks: PrepareDisk (the base is there at
/// once), ExportOverlay (the first export stalls after one chunk, later ones finish),
/// ImportOverlay (installs only a complete stream whose trailer matches), EnsureOverlay.
struct FakeAgent {
    node: String,
    seen: Shared,
}

impl FakeAgent {
    fn record(&self, rpc: &'static str, detail: String) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .calls
            .push((self.node.clone(), rpc, detail));
    }

    fn exports_so_far(&self) -> usize {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.calls
            .iter()
            .filter(|(n, rpc, _)| *n == self.node && *rpc == "ExportOverlay")
            .count()
    }
}

fn chunk(part: Part) -> Result<pb::OverlayChunk, Status> {
    Ok(pb::OverlayChunk { part: Some(part) })
}

#[tonic::async_trait]
impl NodeAgent for FakeAgent {
    async fn get_capabilities(
        &self,
        _: GrpcRequest<pb::GetCapabilitiesRequest>,
    ) -> Result<GrpcResponse<pb::NodeCapabilities>, Status> {
        Err(Status::unimplemented("not used by a disk move"))
    }

    type PrepareDiskStream = Stream_<pb::DiskProgress>;
    async fn prepare_disk(
        &self,
        req: GrpcRequest<pb::PrepareDiskRequest>,
    ) -> Result<GrpcResponse<Self::PrepareDiskStream>, Status> {
        self.record("PrepareDisk", req.into_inner().disk_uid);
        let done = pb::DiskProgress {
            phase: pb::disk_progress::Phase::Ready as i32,
            digest: BASE_DIGEST.into(),
            virtual_bytes: 1 << 30,
            ..Default::default()
        };
        Ok(GrpcResponse::new(Box::pin(tokio_stream::iter([Ok(done)]))))
    }

    async fn ensure_overlay(
        &self,
        req: GrpcRequest<pb::EnsureOverlayRequest>,
    ) -> Result<GrpcResponse<pb::OverlayInfo>, Status> {
        let r = req.into_inner();
        self.record(
            "EnsureOverlay",
            format!("{} {} {}", r.vm_uid, r.disk_name, r.base_digest),
        );
        Ok(GrpcResponse::new(pb::OverlayInfo::default()))
    }

    async fn delete_overlay(
        &self,
        req: GrpcRequest<pb::DeleteOverlayRequest>,
    ) -> Result<GrpcResponse<pb::DeleteOverlayResponse>, Status> {
        let r = req.into_inner();
        self.record("DeleteOverlay", format!("{} {}", r.vm_uid, r.disk_name));
        Ok(GrpcResponse::new(pb::DeleteOverlayResponse::default()))
    }

    async fn release_disk(
        &self,
        _: GrpcRequest<pb::ReleaseDiskRequest>,
    ) -> Result<GrpcResponse<pb::ReleaseDiskResponse>, Status> {
        Err(Status::unimplemented("not used by a disk move"))
    }

    type ExportOverlayStream = Stream_<pb::OverlayChunk>;
    async fn export_overlay(
        &self,
        req: GrpcRequest<pb::ExportOverlayRequest>,
    ) -> Result<GrpcResponse<Self::ExportOverlayStream>, Status> {
        let r = req.into_inner();
        let first = self.exports_so_far() == 0;
        self.record("ExportOverlay", format!("{} {}", r.vm_uid, r.disk_name));
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
            // Stalls half way: the operator relaying it dies meanwhile.
            let stalled = tokio_stream::StreamExt::chain(
                tokio_stream::iter(parts),
                futures::stream::pending(),
            );
            return Ok(GrpcResponse::new(Box::pin(stalled)));
        }
        parts.push(chunk(Part::Data(pb::OverlayData {
            file: 0,
            offset: head.len() as u64,
            bytes: tail.to_vec(),
        })));
        parts.push(chunk(Part::Trailer(pb::OverlayTrailer {
            sha256: vec![hex_sha256(&bytes)],
        })));
        Ok(GrpcResponse::new(Box::pin(tokio_stream::iter(parts))))
    }

    async fn import_overlay(
        &self,
        req: GrpcRequest<tonic::Streaming<pb::OverlayChunk>>,
    ) -> Result<GrpcResponse<pb::OverlayInfo>, Status> {
        let mut stream = req.into_inner();
        let mut move_id = String::new();
        let mut file = Vec::new();
        let mut installed = false;
        // A stream that breaks or ends without a trailer installs nothing, as in the
        // real agent.
        while let Ok(Some(msg)) = stream.message().await {
            match msg.part {
                Some(Part::Header(h)) => move_id = h.move_id,
                Some(Part::Data(d)) => {
                    if d.offset != file.len() as u64 {
                        return Err(Status::invalid_argument("a gap in the stream"));
                    }
                    file.extend_from_slice(&d.bytes);
                    self.seen
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .chunks_received += 1;
                }
                Some(Part::Trailer(t)) => {
                    installed = t.sha256 == vec![hex_sha256(&file)];
                    break;
                }
                None => {}
            }
        }
        self.record("ImportOverlay", move_id.clone());
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .imports
            .push((move_id, installed));
        if installed {
            Ok(GrpcResponse::new(pb::OverlayInfo::default()))
        } else {
            Err(Status::aborted("the stream ended before its trailer"))
        }
    }

    async fn ensure_network(
        &self,
        _: GrpcRequest<pb::EnsureNetworkRequest>,
    ) -> Result<GrpcResponse<pb::NetworkState>, Status> {
        Err(Status::unimplemented("not used by a disk move"))
    }

    async fn delete_network(
        &self,
        _: GrpcRequest<pb::DeleteNetworkRequest>,
    ) -> Result<GrpcResponse<pb::DeleteNetworkResponse>, Status> {
        Err(Status::unimplemented("not used by a disk move"))
    }

    async fn get_vm(&self, _: GrpcRequest<pb::VmRef>) -> Result<GrpcResponse<pb::VmState>, Status> {
        Err(Status::unimplemented("not used by a disk move"))
    }

    async fn prepare_migration_target(
        &self,
        _: GrpcRequest<pb::PrepareMigrationTargetRequest>,
    ) -> Result<GrpcResponse<pb::MigrationEndpoint>, Status> {
        Err(Status::unimplemented("not used by a disk move"))
    }

    type StartMigrationStream = Stream_<pb::MigrationProgress>;
    async fn start_migration(
        &self,
        _: GrpcRequest<pb::StartMigrationRequest>,
    ) -> Result<GrpcResponse<Self::StartMigrationStream>, Status> {
        Err(Status::unimplemented("not used by a disk move"))
    }

    async fn cancel_migration(
        &self,
        _: GrpcRequest<pb::CancelMigrationRequest>,
    ) -> Result<GrpcResponse<pb::CancelMigrationResponse>, Status> {
        Err(Status::unimplemented("not used by a disk move"))
    }
}

/// Serves one fake agent per node on one port: node n1 at 127.0.0.1, n2 at 127.0.0.2
/// (the operator dials every node on the same port, by its address).
async fn serve_agents(seen: &Shared) -> u16 {
    for _ in 0..50 {
        let first = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = first.local_addr().expect("addr").port();
        let Ok(second) = tokio::net::TcpListener::bind(("127.0.0.2", port)).await else {
            continue;
        };
        for (node, listener) in [("n1", first), ("n2", second)] {
            let agent = FakeAgent {
                node: node.into(),
                seen: seen.clone(),
            };
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(NodeAgentServer::new(agent))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
        }
        return port;
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

fn agent_node(name: &str, ip: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"hvx.dev/agent": "ready"}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
    }))
    .expect("node")
}

fn launch_spec() -> LaunchSpec {
    serde_json::from_value(json!({
        "namespace": "prod", "application": "shop", "vmId": "u-1/db",
        "vm": {"name": "db", "memoryMib": 256,
               "disks": [{"name": "root", "overlayDisk": {"name": "db-root"}, "controller": "pvscsi", "unit": 0}]},
        "disks": [{"name": "root", "diskUid": "d-1"}],
        "nics": []
    }))
    .expect("launch spec")
}

/// The VM's launcher pod, bound to n2, whose disks its annotation says are on n1.
fn moving_pod() -> Pod {
    let spec = serde_json::to_string(&launch_spec()).expect("json");
    let mut pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "shop-db", "namespace": "prod", "uid": POD_UID, "resourceVersion": "1",
                     "labels": {"hvx.dev/app": "shop", "hvx.dev/vm": "db", "hvx.dev/role": "launcher"},
                     "annotations": {"hvx.dev/launch-spec": spec, "hvx.dev/disks-on": "n1"},
                     "ownerReferences": [{"apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
                                          "name": "shop", "uid": "u-1", "controller": true}]},
        "spec": {"nodeName": "n2", "containers": []}
    }))
    .expect("pod");
    seal_key().seal_pod(&mut pod, "u-1");
    pod
}

fn application() -> VmApplication {
    serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
        "metadata": {"name": "shop", "namespace": "prod", "uid": "u-1", "generation": 1},
        "spec": {"vms": [{"name": "db", "memoryMib": 256,
            "disks": [{"name": "root", "overlayDisk": {"name": "db-root"}, "controller": "pvscsi", "unit": 0}]}]}
    }))
    .expect("app")
}

fn disk() -> OverlayDisk {
    serde_json::from_value(json!({
        "apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk",
        "metadata": {"name": "db-root", "namespace": "prod", "uid": "d-1", "generation": 1},
        "spec": {"source": {"http": {"url": "http://images.example/db.vmdk"}}}
    }))
    .expect("disk")
}

/// A freshly started operator's context: caches filled, nothing in memory.
fn operator(port: u16) -> (Arc<Context>, mock::Handle<Request<Body>, Response<Body>>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let mut config = OperatorConfig::default();
    config.agents.port = port;
    config.agents.timeout = Duration::from_secs(5);
    config.timings.disk_move_idle_seconds = 60;
    let stores = Stores::new(
        store_of(vec![
            agent_node("n1", "127.0.0.1"),
            agent_node("n2", "127.0.0.2"),
        ]),
        store_of(vec![moving_pod()]),
        store_of(vec![]),
        store_of(vec![]),
        store_of(vec![disk()]),
        store_of(vec![application()]),
        seal_key(),
    );
    let ctx = Context::with_metrics(
        client,
        config,
        Reporter {
            controller: "test".into(),
            instance: None,
        },
        Arc::default(),
        stores,
    );
    (Arc::new(ctx), handle)
}

/// Answers every request as a permissive API server would (a write returns its own
/// body, a pod patch the pod), recording method, path and body.
fn api_server(
    mut handle: mock::Handle<Request<Body>, Response<Body>>,
) -> tokio::task::JoinHandle<Vec<(Method, String, Value)>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            // A pod patch answers with the pod (a merge patch's nulls are not a pod).
            let mut answer = if path.contains("/pods/") {
                serde_json::to_value(moving_pod()).expect("json")
            } else {
                body.clone()
            };
            if answer.get("metadata").is_none() {
                answer["metadata"] = json!({"name": "x"});
            }
            send.send_response(
                Response::builder()
                    .status(200)
                    .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                    .expect("response"),
            );
            seen.push((method, path, body));
        }
        seen
    })
}

/// Runs passes of the disk step as the VmApplication controller would, until the disks
/// are ready on the pod's node or `deadline` passes.
async fn passes_until_ready(ctx: &Arc<Context>, deadline: Duration) -> Vec<DisksState> {
    let cluster = Cluster {
        node_ips: ctx.stores.agent_nodes(),
    };
    let (app, pod, ls) = (application(), moving_pod(), launch_spec());
    let started = Instant::now();
    let mut states = Vec::new();
    while started.elapsed() < deadline {
        let state = hvx_operator::diskmove::prepare_disks(ctx, &app, &cluster, &pod, "n2", &ls)
            .await
            .expect("a pass of the disk step");
        let ready = state == DisksState::Ready;
        states.push(state);
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_move_cut_by_an_operator_restart_resumes_from_the_pod_and_keeps_the_old_copy() {
    let seen: Shared = Arc::default();
    let port = serve_agents(&seen).await;
    let chunks = || {
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .chunks_received
    };

    // The first operator starts the move; it is killed with the relay half way (its
    // runtime, with every task and connection of it, is dropped).
    let first = tokio::runtime::Runtime::new().expect("runtime");
    first.spawn(async move {
        let (ctx, handle) = operator(port);
        let _api = api_server(handle);
        passes_until_ready(&ctx, Duration::from_secs(30)).await
    });
    let started = Instant::now();
    while chunks() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the first operator never relayed a chunk: {:?}",
            seen.lock().unwrap_or_else(|p| p.into_inner())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.shutdown_background();
    // The cut import ends on the new node, installing nothing.
    let started = Instant::now();
    while seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .imports
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new node's import did not end with the operator"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A new operator, nothing in memory: the pod still says the disks are on n1.
    let (ctx, handle) = operator(port);
    let api = api_server(handle);
    let states = passes_until_ready(&ctx, Duration::from_secs(30)).await;
    drop(ctx);
    let requests = api.await.expect("api server");
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());

    assert_eq!(
        states.last(),
        Some(&DisksState::Ready),
        "the restarted operator finishes the move: {states:?} {seen:?}"
    );
    assert!(
        states
            .iter()
            .any(|s| matches!(s, DisksState::Waiting(w) if w.contains("moving"))),
        "progress says a move runs meanwhile: {states:?}"
    );
    // Both attempts carry the pod's uid as move id (idempotent on the target); only
    // the complete one installed anything, once.
    assert_eq!(
        seen.imports,
        vec![(POD_UID.to_string(), false), (POD_UID.to_string(), true)],
        "{seen:?}"
    );
    let exports: Vec<_> = seen
        .calls
        .iter()
        .filter(|(_, rpc, _)| *rpc == "ExportOverlay")
        .collect();
    assert!(
        exports.len() == 2
            && exports
                .iter()
                .all(|(n, _, d)| n == "n1" && d == "u-1/db root"),
        "exported twice from the old node: {exports:?}"
    );
    // Then the overlay is ensured where the VM runs, and the old copy is kept (it is
    // deleted only once the VM runs there).
    assert!(
        seen.calls.iter().any(|(n, rpc, d)| n == "n2"
            && *rpc == "EnsureOverlay"
            && *d == format!("u-1/db root {BASE_DIGEST}")),
        "{seen:?}"
    );
    assert!(
        !seen.calls.iter().any(|(_, rpc, _)| *rpc == "DeleteOverlay"),
        "nothing deleted before the VM runs: {seen:?}"
    );
    // The outcome is on the pod, sealed: disks-on gone, disks-moved-from n1.
    let patch = requests
        .iter()
        .find(|(m, p, _)| *m == Method::PATCH && p == "/api/v1/namespaces/prod/pods/shop-db")
        .unwrap_or_else(|| panic!("the pod records the move: {requests:?}"));
    let annotations = &patch.2["metadata"]["annotations"];
    assert_eq!(
        annotations["hvx.dev/disks-on"],
        Value::Null,
        "{annotations}"
    );
    assert_eq!(
        annotations["hvx.dev/disks-moved-from"], "n1",
        "{annotations}"
    );
    let seal = annotations[Sealed::DisksMovedFrom.seal_key()]
        .as_str()
        .unwrap_or_else(|| panic!("sealed: {annotations}"));
    let subject = Subject {
        namespace: "prod",
        pod: "shop-db",
        owner_uid: "u-1",
    };
    assert!(
        seal_key()
            .verify(&subject, Sealed::DisksMovedFrom, "n1", Some(seal))
            .is_ok(),
        "the seal verifies: {annotations}"
    );
    let events: Vec<&str> = requests
        .iter()
        .filter(|(m, p, _)| *m == Method::POST && p.contains("/events"))
        .filter_map(|(_, _, b)| b["reason"].as_str())
        .collect();
    assert!(
        events.contains(&"VmDisksMoving") && events.contains(&"VmDisksMoved"),
        "{events:?}"
    );
}
