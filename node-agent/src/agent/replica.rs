//! Replicated VM disks on a node (issue 18). Two roles:
//!
//! - **Replica side** (`PrepareReplica`, `StopReplica`): an empty overlay of the VM's
//!   disk over the same content-addressed base, in the disk store under the VM's own
//!   disk key (so a failover here finds it as the VM's disk), served as a writable NBD
//!   export over TLS-PSK by a `qemu-storage-daemon` child of the agent (dies with
//!   the agent, recorded and reaped by the next one). The export is `writethrough`:
//!   each write the replica acknowledges is flushed into the overlay file, qcow2
//!   metadata included, so a replica daemon killed with its agent leaves a
//!   consistent overlay holding every write it acknowledged. The replica's record
//!   and key live in the agent's persistent state (`agent/replicas/<vm key>.<disk>/`)
//!   and a restarted agent serves every recorded replica again on the same port.
//! - **VM side** (`StartReplication`, `GetReplication`, `StopReplication`): the VM's
//!   QEMU mirrors the disk's top overlay into that export (`hvx_vmm::replication`),
//!   driven on the agent's own QMP monitor like live migration. The job lives in
//!   QEMU; the agent keeps only a record in the VM's run dir (endpoint, mode, and
//!   why it broke once it did).

use super::error::AgentError;
use super::{Agent, vms, write_atomic};
use hvx_proto::v1 as pb;
use hvx_proto::v1::replication_status::State as PbState;
use hvx_vmm::migration::write_psk;
use hvx_vmm::replication::{self, Mode, ReplicaEndpoint, State};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The replica server binary.
pub const DAEMON: &str = "qemu-storage-daemon";
/// How long a new replica daemon may take to listen (about 1 s on a busy 2-core
/// node; seen above 10 s with the node's cores oversubscribed several times).
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

/// A replica daemon this agent runs.
#[derive(Debug)]
pub struct Serving {
    child: tokio::process::Child,
    _record: hvx_child::Tracked,
}

/// What is persisted of one replica (`agent/replicas/<vm key>.<disk>/replica.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaRecord {
    /// The VM's id (application UID / VM name).
    pub vm_uid: String,
    /// The VM disk.
    pub disk: String,
    /// Base digest (hex).
    pub base_digest: String,
    /// Build of the replica (the operator's).
    pub generation: u64,
    /// Where it is served.
    pub host: String,
    /// NBD port.
    pub port: u16,
}

/// The VM side's record of one disk's replication (`<run dir>/replication-<disk>.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationRecord {
    /// The VM disk.
    pub disk: String,
    /// Replica address.
    pub host: String,
    /// Replica NBD port.
    pub port: u16,
    /// Export name.
    pub export: String,
    /// Replica generation.
    pub generation: u64,
    /// `true`: Synchronous.
    pub synchronous: bool,
    /// Why it broke (QEMU's reason), once it did: the job is gone by then.
    #[serde(default)]
    pub broken: Option<String>,
}

/// VM disk names are DNS labels (the CRD's pattern); checked again here because
/// they become file, QOM and NBD export names.
pub fn check_disk_name(d: &str) -> Result<(), AgentError> {
    let ok = !d.is_empty()
        && d.len() <= 63
        && d.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !d.starts_with('-')
        && !d.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(AgentError::Invalid(format!("bad disk name {d:?}")))
    }
}

/// A replica's key: 16 bytes at least, never all zero (a key nobody chose).
pub fn check_replica_psk(psk: &[u8]) -> Result<(), AgentError> {
    if psk.len() < 16 {
        return Err(AgentError::Invalid(
            "a replica needs a TLS pre-shared key of 16 bytes at least".into(),
        ));
    }
    if psk.iter().all(|b| *b == 0) {
        return Err(AgentError::Invalid(
            "the replica's TLS pre-shared key is all zero".into(),
        ));
    }
    Ok(())
}

/// The `qemu-storage-daemon` arguments serving `blockdev` (the disk chain's nested
/// blockdev JSON, top layer writable) as export `export` on `host:port` (pure).
pub fn daemon_args(
    blockdev: &serde_json::Value,
    tls_dir: &Path,
    host: &str,
    port: u16,
    export: &str,
) -> Vec<String> {
    let node = blockdev
        .get("node-name")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    vec![
        "--object".into(),
        format!(
            "tls-creds-psk,id=tls0,endpoint=server,dir={}",
            tls_dir.display()
        ),
        "--blockdev".into(),
        blockdev.to_string(),
        "--nbd-server".into(),
        format!("addr.type=inet,addr.host={host},addr.port={port},tls-creds=tls0"),
        "--export".into(),
        // writethrough: acknowledged means flushed into the file (see the module doc).
        format!("type=nbd,id=replica,node-name={node},name={export},writable=on,writethrough=on"),
    ]
}

fn replica_key(vm: &str, disk: &str) -> String {
    format!("{}.{disk}", hvx_api::node::vm_key(vm))
}

fn replicas_root(agent: &Agent) -> PathBuf {
    agent.paths.agent_state().join("replicas")
}

fn replica_dir(agent: &Agent, vm: &str, disk: &str) -> PathBuf {
    replicas_root(agent).join(replica_key(vm, disk))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), AgentError> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| AgentError::Io {
        what: format!("encoding {}", path.display()),
        source: std::io::Error::other(e),
    })?;
    write_atomic(path, &bytes)
}

fn vm_of(vm: Option<&pb::VmRef>) -> Result<String, AgentError> {
    let uid = vm.map(|v| v.vm_uid.clone()).unwrap_or_default();
    vms::check_vm_uid(&uid)?;
    Ok(uid)
}

fn free_port(ip: std::net::Ipv4Addr) -> Result<u16, AgentError> {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(AgentError::io(format!("finding a free port on {ip}")))
}

fn endpoint_of(rec: &ReplicaRecord) -> pb::ReplicaEndpoint {
    pb::ReplicaEndpoint {
        host: rec.host.clone(),
        port: u32::from(rec.port),
        export_name: replication::export_name(&rec.disk),
        generation: rec.generation,
    }
}

/// PrepareReplica.
pub async fn prepare(
    agent: &Agent,
    req: &pb::PrepareReplicaRequest,
) -> Result<pb::ReplicaEndpoint, AgentError> {
    let vm = vm_of(req.vm.as_ref())?;
    check_disk_name(&req.disk_name)?;
    check_replica_psk(&req.tls_psk)?;
    let digest = req
        .base_digest
        .trim()
        .trim_start_matches("sha256:")
        .to_ascii_lowercase();
    if digest.is_empty() || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AgentError::Invalid(format!(
            "bad base digest {:?}",
            req.base_digest
        )));
    }
    let key = replica_key(&vm, &req.disk_name);
    let _guard = agent.lock(&format!("replica/{key}")).await;
    let dir = replica_dir(agent, &vm, &req.disk_name);
    let (ns, name) = hvx_api::node::vm_overlay_ref(&vm, &req.disk_name);
    let _disk = agent.lock(&format!("overlay/{ns}/{name}")).await;
    if let Some(pid) = vms::live_qemu(&agent.paths.vm_run_dir(&vm)) {
        return Err(AgentError::Precondition(format!(
            "VM {vm} runs on this node (QEMU pid {pid}): its replica must be on another node"
        )));
    }
    let tls_dir = dir.join("tls");
    let existing: Option<ReplicaRecord> = read_json(&dir.join("replica.json"));
    if let Some(rec) = existing
        .filter(|r| r.generation == req.generation && r.base_digest == digest && r.vm_uid == vm)
        && agent.store.load_disk(&ns, &name).is_ok()
    {
        // Again (an operator that restarted, a new key): the daemon reads the key at
        // each TLS handshake.
        write_psk(&tls_dir, &req.tls_psk)?;
        ensure_serving(agent, &rec).await?;
        return Ok(endpoint_of(&rec));
    }
    // A new build: whatever this node held of the disk is stale (the mirror copies
    // only what the VM's top overlay holds onto an empty overlay).
    stop_serving(agent, &key).await;
    if agent.store.base(&digest).is_err() {
        return Err(AgentError::Precondition(format!(
            "base {} of disk {} is not on this node: PrepareDisk first",
            req.base_digest, req.disk_name
        )));
    }
    agent.store.delete_disk(&ns, &name)?;
    let size = (req.virtual_bytes > 0).then_some(req.virtual_bytes);
    agent.store.create_disk(&ns, &name, &digest, size).await?;
    std::fs::create_dir_all(&dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
    write_psk(&tls_dir, &req.tls_psk)?;
    let ip = agent.config.node_ip;
    let rec = ReplicaRecord {
        vm_uid: vm.clone(),
        disk: req.disk_name.clone(),
        base_digest: digest,
        generation: req.generation,
        host: ip.to_string(),
        port: free_port(ip)?,
    };
    write_json(&dir.join("replica.json"), &rec)?;
    ensure_serving(agent, &rec).await?;
    tracing::info!(%vm, disk = %rec.disk, generation = rec.generation, port = rec.port, "replica prepared");
    Ok(endpoint_of(&rec))
}

/// Starts the daemon of a recorded replica unless one of this agent serves it.
async fn ensure_serving(agent: &Agent, rec: &ReplicaRecord) -> Result<(), AgentError> {
    let key = replica_key(&rec.vm_uid, &rec.disk);
    {
        let mut serving = agent.replicas.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = serving.get_mut(&key) {
            if matches!(s.child.try_wait(), Ok(None)) {
                return Ok(());
            }
            tracing::warn!(replica = %key, "replica daemon had exited; starting it again");
            serving.remove(&key);
        }
    }
    let (ns, name) = hvx_api::node::vm_overlay_ref(&rec.vm_uid, &rec.disk);
    let meta = agent.store.load_disk(&ns, &name)?;
    let view = agent.store.disk_view(&meta)?;
    let dir = replica_dir(agent, &rec.vm_uid, &rec.disk);
    let log_path = dir.join("daemon.log");
    let log = std::fs::File::create(&log_path)
        .map_err(AgentError::io(format!("creating {}", log_path.display())))?;
    let mut cmd = tokio::process::Command::new(DAEMON);
    cmd.args(daemon_args(
        &view.blockdev,
        &dir.join("tls"),
        &rec.host,
        rec.port,
        &replication::export_name(&rec.disk),
    ))
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(log)
    .kill_on_drop(true);
    let mut child = hvx_child::spawn_tokio(cmd)
        .await
        .map_err(AgentError::io(format!("starting {DAEMON}")))?;
    let tracked = hvx_child::Tracker::track_global(child.id(), &format!("{DAEMON} replica {key}"));
    let addr = format!("{}:{}", rec.host, rec.port);
    let until = tokio::time::Instant::now() + LISTEN_TIMEOUT;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let why = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(AgentError::Host(format!(
                "{DAEMON} for replica {key} exited ({st}): {}",
                why.trim()
            )));
        }
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            break;
        }
        if tokio::time::Instant::now() >= until {
            let _ = child.start_kill();
            let said = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(AgentError::Host(format!(
                "{DAEMON} for replica {key} does not listen on {addr} after {}s: {}",
                LISTEN_TIMEOUT.as_secs(),
                said.trim()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent
        .replicas
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            key,
            Serving {
                child,
                _record: tracked,
            },
        );
    Ok(())
}

/// Kills a replica's daemon and waits for it (the export is writethrough: nothing
/// acknowledged is lost by the kill).
async fn stop_serving(agent: &Agent, key: &str) {
    let serving = agent
        .replicas
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(key);
    if let Some(mut s) = serving {
        let _ = s.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.child.wait()).await;
    }
}

/// Stops serving a replica of (`vm`, `disk`) and forgets it (record and key); the
/// overlay stays. Nothing served: nothing to do. Also the first step of
/// DeleteOverlay: a daemon must never go on serving (and acknowledging writes into)
/// files deleted under it.
pub async fn forget(agent: &Agent, vm: &str, disk: &str) -> Result<(), AgentError> {
    let key = replica_key(vm, disk);
    let _guard = agent.lock(&format!("replica/{key}")).await;
    stop_serving(agent, &key).await;
    let dir = replica_dir(agent, vm, disk);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::Io {
            what: format!("removing {}", dir.display()),
            source: e,
        }),
    }
}

/// StopReplica.
pub async fn stop(agent: &Agent, req: &pb::StopReplicaRequest) -> Result<(), AgentError> {
    let vm = vm_of(req.vm.as_ref())?;
    check_disk_name(&req.disk_name)?;
    forget(agent, &vm, &req.disk_name).await?;
    if req.discard {
        let (ns, name) = hvx_api::node::vm_overlay_ref(&vm, &req.disk_name);
        let _disk = agent.lock(&format!("overlay/{ns}/{name}")).await;
        if vms::live_qemu(&agent.paths.vm_run_dir(&vm)).is_some() {
            return Err(AgentError::Precondition(format!(
                "VM {vm} runs on this node: its disk is no replica to discard"
            )));
        }
        agent.store.delete_disk(&ns, &name)?;
    }
    tracing::info!(%vm, disk = %req.disk_name, discard = req.discard, "replica stopped");
    Ok(())
}

/// Serves every recorded replica again (agent start). Returns how many serve.
pub async fn restore(agent: &Agent) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(replicas_root(agent))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(rec) = read_json::<ReplicaRecord>(&entry.path().join("replica.json")) else {
            continue;
        };
        let _guard = agent
            .lock(&format!("replica/{}", replica_key(&rec.vm_uid, &rec.disk)))
            .await;
        // The previous daemon may hold the overlay's lock for a moment after its
        // agent died (its kill is asynchronous): a few tries.
        for attempt in 1..=5 {
            match ensure_serving(agent, &rec).await {
                Ok(()) => {
                    n += 1;
                    break;
                }
                Err(e) if attempt == 5 => {
                    tracing::warn!(vm = %rec.vm_uid, disk = %rec.disk, error = %e, "serving a recorded replica again")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    n
}

impl Agent {
    /// Kills every replica daemon of this agent, as the death of the agent process
    /// does (their parent-death signal); the records stay for the next agent.
    pub fn kill_replicas(&self) {
        let all: Vec<Serving> = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, s)| s)
            .collect();
        for mut s in all {
            let _ = s.child.start_kill();
        }
    }
}

fn record_path(run_dir: &Path, disk: &str) -> PathBuf {
    run_dir.join(format!("replication-{disk}.json"))
}

fn tls_dir(run_dir: &Path, disk: &str) -> PathBuf {
    run_dir.join("replication-tls").join(disk)
}

async fn agent_qmp(run_dir: &Path) -> Result<hvx_vmm::qmp::QmpClient, AgentError> {
    let paths = hvx_vmm::RunPaths::new(run_dir);
    Ok(hvx_vmm::qmp::QmpClient::connect(&paths.qmp_agent, Duration::from_secs(10)).await?)
}

fn pb_mode(synchronous: bool) -> pb::ReplicationMode {
    if synchronous {
        pb::ReplicationMode::Synchronous
    } else {
        pb::ReplicationMode::Asynchronous
    }
}

/// The answer for a record and QEMU's view (pure).
pub fn status_message(rec: &ReplicationRecord, s: &replication::Status) -> pb::ReplicationStatus {
    let (state, message) = match &s.state {
        State::Syncing => (PbState::Syncing, String::new()),
        State::InSync => (PbState::InSync, String::new()),
        State::Broken(why) => (PbState::Broken, why.clone()),
    };
    pb::ReplicationStatus {
        state: state as i32,
        mode: pb_mode(rec.synchronous) as i32,
        copied_bytes: s.offset,
        total_bytes: s.len,
        lag_bytes: s.lag,
        message,
        replica: Some(pb::ReplicaEndpoint {
            host: rec.host.clone(),
            port: u32::from(rec.port),
            export_name: rec.export.clone(),
            generation: rec.generation,
        }),
    }
}

fn broken(rec: &ReplicationRecord, why: String) -> pb::ReplicationStatus {
    status_message(
        rec,
        &replication::Status {
            state: State::Broken(why),
            offset: 0,
            len: 0,
            lag: 0,
        },
    )
}

/// StartReplication.
pub async fn start_replication(
    agent: &Agent,
    req: &pb::StartReplicationRequest,
) -> Result<pb::ReplicationStatus, AgentError> {
    let vm = vm_of(req.vm.as_ref())?;
    check_disk_name(&req.disk_name)?;
    check_replica_psk(&req.tls_psk)?;
    let ep = req
        .replica
        .as_ref()
        .ok_or_else(|| AgentError::Invalid("no replica endpoint".into()))?;
    if ep.host.parse::<std::net::IpAddr>().is_err() {
        return Err(AgentError::Invalid(format!(
            "replica host {:?} is not an IP address",
            ep.host
        )));
    }
    let port = u16::try_from(ep.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| AgentError::Invalid(format!("bad replica port {}", ep.port)))?;
    if ep.export_name != replication::export_name(&req.disk_name) {
        return Err(AgentError::Invalid(format!(
            "replica export {:?} is not disk {}'s",
            ep.export_name, req.disk_name
        )));
    }
    let mode = match pb::ReplicationMode::try_from(req.mode) {
        Ok(pb::ReplicationMode::Synchronous) => Mode::Synchronous,
        Ok(pb::ReplicationMode::Asynchronous) => Mode::Asynchronous,
        _ => {
            return Err(AgentError::Invalid(
                "replication mode must be Synchronous or Asynchronous".into(),
            ));
        }
    };
    let _guard = agent
        .lock(&format!("replication/{vm}/{}", req.disk_name))
        .await;
    let run_dir = agent.paths.vm_run_dir(&vm);
    if vms::live_qemu(&run_dir).is_none() {
        return Err(AgentError::Precondition(format!(
            "VM {vm} is not running on this node"
        )));
    }
    // sync=top copies the active layer onto an overlay of the base: a chain with
    // snapshots would lose what the lower layers hold.
    let (ns, name) = hvx_api::node::vm_overlay_ref(&vm, &req.disk_name);
    let layers = agent
        .store
        .load_disk(&ns, &name)
        .map_or(0, |meta| meta.chain_of(&meta.active).len());
    if layers > 1 {
        return Err(AgentError::Precondition(format!(
            "disk {} has {layers} layers (snapshots): replication mirrors one layer",
            req.disk_name
        )));
    }
    let rec = ReplicationRecord {
        disk: req.disk_name.clone(),
        host: ep.host.clone(),
        port,
        export: ep.export_name.clone(),
        generation: ep.generation,
        synchronous: mode == Mode::Synchronous,
        broken: None,
    };
    let tls = tls_dir(&run_dir, &req.disk_name);
    write_psk(&tls, &req.tls_psk)?;
    write_json(&record_path(&run_dir, &req.disk_name), &rec)?;
    let qmp = agent_qmp(&run_dir).await?;
    let endpoint = ReplicaEndpoint {
        host: rec.host.clone(),
        port,
        export: rec.export.clone(),
    };
    let s = replication::start(&qmp, &req.disk_name, &endpoint, &tls, mode).await?;
    tracing::info!(%vm, disk = %req.disk_name, replica = %format!("{}:{}", rec.host, rec.port), ?mode, "replication started");
    Ok(status_message(&rec, &s))
}

/// GetReplication. A replication found broken is recorded as such (with QEMU's
/// reason) and its job cleared from QEMU.
pub async fn get_replication(
    agent: &Agent,
    req: &pb::GetReplicationRequest,
) -> Result<pb::ReplicationStatus, AgentError> {
    let vm = vm_of(req.vm.as_ref())?;
    check_disk_name(&req.disk_name)?;
    let _guard = agent
        .lock(&format!("replication/{vm}/{}", req.disk_name))
        .await;
    let run_dir = agent.paths.vm_run_dir(&vm);
    let path = record_path(&run_dir, &req.disk_name);
    let mut rec: ReplicationRecord = read_json(&path).ok_or_else(|| {
        AgentError::Precondition(format!(
            "disk {} of VM {vm} is not replicated from this node",
            req.disk_name
        ))
    })?;
    if let Some(why) = &rec.broken {
        return Ok(broken(&rec, why.clone()));
    }
    if vms::live_qemu(&run_dir).is_none() {
        return Ok(broken(&rec, "the VM does not run on this node".into()));
    }
    let qmp = agent_qmp(&run_dir).await?;
    let s = replication::status(&qmp, &req.disk_name).await?;
    if let State::Broken(why) = &s.state {
        tracing::warn!(%vm, disk = %req.disk_name, reason = %why, "replication broken; the VM runs unreplicated");
        rec.broken = Some(why.clone());
        write_json(&path, &rec)?;
        replication::stop(&qmp, &req.disk_name).await?;
    }
    Ok(status_message(&rec, &s))
}

/// StopReplication.
pub async fn stop_replication(
    agent: &Agent,
    req: &pb::StopReplicationRequest,
) -> Result<(), AgentError> {
    let vm = vm_of(req.vm.as_ref())?;
    check_disk_name(&req.disk_name)?;
    let _guard = agent
        .lock(&format!("replication/{vm}/{}", req.disk_name))
        .await;
    let run_dir = agent.paths.vm_run_dir(&vm);
    if vms::live_qemu(&run_dir).is_some() {
        let qmp = agent_qmp(&run_dir).await?;
        replication::stop(&qmp, &req.disk_name).await?;
    }
    super::remove_file(&record_path(&run_dir, &req.disk_name))?;
    let _ = std::fs::remove_dir_all(tls_dir(&run_dir, &req.disk_name));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_be_long_and_chosen() {
        assert!(check_replica_psk(&[7u8; 32]).is_ok());
        assert!(check_replica_psk(&[0u8; 32]).is_err());
        assert!(check_replica_psk(&[7u8; 15]).is_err());
        assert!(check_replica_psk(&[]).is_err());
    }

    #[test]
    fn disk_names_are_dns_labels() {
        for ok in ["boot", "data-1", "a"] {
            assert!(check_disk_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a/b", "a,b", "../x", &"x".repeat(64)] {
            assert!(check_disk_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_daemon_serves_the_top_layer_writable_over_tls_only() {
        let blockdev = serde_json::json!({"driver": "qcow2", "node-name": "l-top",
            "file": {"driver": "file", "filename": "/s/top.qcow2"},
            "backing": {"driver": "qcow2", "node-name": "l-base", "read-only": true,
                        "file": {"driver": "file", "filename": "/s/base.qcow2"}}});
        let args = daemon_args(
            &blockdev,
            Path::new("/a/tls"),
            "10.0.0.2",
            10809,
            "disk-boot",
        );
        assert_eq!(args[1], "tls-creds-psk,id=tls0,endpoint=server,dir=/a/tls");
        let bd: serde_json::Value = serde_json::from_str(&args[3]).expect("json");
        assert_eq!(bd, blockdev);
        assert_eq!(
            args[5],
            "addr.type=inet,addr.host=10.0.0.2,addr.port=10809,tls-creds=tls0"
        );
        assert_eq!(
            args[7],
            "type=nbd,id=replica,node-name=l-top,name=disk-boot,writable=on,writethrough=on"
        );
    }

    #[test]
    fn statuses_carry_state_lag_and_reason() {
        let rec = ReplicationRecord {
            disk: "boot".into(),
            host: "10.0.0.2".into(),
            port: 10809,
            export: "disk-boot".into(),
            generation: 3,
            synchronous: true,
            broken: None,
        };
        let s = status_message(
            &rec,
            &replication::Status {
                state: State::InSync,
                offset: 90,
                len: 100,
                lag: 10,
            },
        );
        assert_eq!(s.state, PbState::InSync as i32);
        assert_eq!(s.mode, pb::ReplicationMode::Synchronous as i32);
        assert_eq!((s.copied_bytes, s.total_bytes, s.lag_bytes), (90, 100, 10));
        assert_eq!(s.replica.expect("endpoint").generation, 3);
        let b = broken(&rec, "Connection refused".into());
        assert_eq!(b.state, PbState::Broken as i32);
        assert_eq!(b.message, "Connection refused");
    }
}
