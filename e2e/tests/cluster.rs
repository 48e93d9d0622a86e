//! Cluster smoke test against whatever `$KUBECONFIG` names (the local harness of
//! `make cluster-up`, or kind): every node Ready, a pod on each schedulable node,
//! HTTP between pods on different nodes, and `kubectl drain` evicting a plain pod
//! and cordoning its node. `cluster_down_leaves_nothing` (ignored; run by
//! `make cluster-down-check`) tears the local cluster down and checks nothing is left.

use hvx_e2e::objects::{
    apiserver_pod_proxy_path, apiserver_service_probe_pod, cluster_dns_probe_pod, http_probe_pod,
    http_server_pod, node_is_cordoned, node_is_ready, node_is_schedulable, pod_ip, pod_phase,
    test_image, test_namespace,
};
use hvx_e2e::wait::{Poll, wait_until};
use hvx_e2e::{E2eError, kubeconfig, tools};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const POLL: Duration = Duration::from_secs(1);
const NODES_READY: Duration = Duration::from_secs(180);
const POD_RUNNING: Duration = Duration::from_secs(180);
const PROBE_DONE: Duration = Duration::from_secs(120);
const DRAIN_SECS: u64 = 120;

fn unique_namespace() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("hvx-e2e-cluster-{}-{nanos:x}", std::process::id())
}

async fn ready_nodes(client: &Client) -> Result<Vec<Node>, E2eError> {
    let nodes: Api<Node> = Api::all(client.clone());
    wait_until("every node Ready", NODES_READY, POLL, || {
        let nodes = nodes.clone();
        async move {
            let list = nodes
                .list(&ListParams::default())
                .await
                .map_err(E2eError::api("listing nodes"))?;
            let not_ready: Vec<String> = list
                .items
                .iter()
                .filter(|n| !node_is_ready(n))
                .map(|n| n.metadata.name.clone().unwrap_or_default())
                .collect();
            Ok(if list.items.is_empty() || !not_ready.is_empty() {
                Poll::NotYet(format!(
                    "{} nodes, not Ready: {not_ready:?}",
                    list.items.len()
                ))
            } else {
                Poll::Done(list.items)
            })
        }
    })
    .await
}

async fn wait_pod(
    pods: &Api<Pod>,
    name: &str,
    phases: &[&str],
    timeout: Duration,
) -> Result<Pod, E2eError> {
    wait_until(
        &format!("pod {name} in {phases:?}"),
        timeout,
        POLL,
        || async move {
            let pod = pods
                .get(name)
                .await
                .map_err(E2eError::api(format!("getting pod {name}")))?;
            let phase = pod_phase(&pod).to_string();
            if phase == "Failed" && !phases.contains(&"Failed") {
                return Err(E2eError::Check(format!(
                    "pod {name} failed: {:?}",
                    pod.status
                )));
            }
            Ok(
                if phases.contains(&phase.as_str())
                    && (phase != "Running" || pod_ip(&pod).is_some())
                {
                    Poll::Done(pod)
                } else {
                    Poll::NotYet(format!("phase {phase}"))
                },
            )
        },
    )
    .await
}

/// One HTTP server pod per schedulable node; each node's probe pod fetches from
/// the server on the next node. Returns (node, server pod) pairs.
async fn check_cross_node_traffic(
    pods: &Api<Pod>,
    nodes: &[String],
) -> Result<Vec<(String, String)>, E2eError> {
    let image = test_image();
    let mut servers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let name = format!("server-{i}");
        pods.create(
            &PostParams::default(),
            &http_server_pod(&name, node, &image),
        )
        .await
        .map_err(E2eError::api(format!("creating {name} on {node}")))?;
        servers.push((node.clone(), name));
    }
    let mut ips = Vec::new();
    for (_, name) in &servers {
        let pod = wait_pod(pods, name, &["Running"], POD_RUNNING).await?;
        ips.push(pod_ip(&pod).unwrap_or_default().to_string());
    }
    for (i, (node, _)) in servers.iter().enumerate() {
        let target = (i + 1) % servers.len();
        let probe = format!("probe-{i}-to-{target}");
        pods.create(
            &PostParams::default(),
            &http_probe_pod(&probe, node, &image, &ips[target]),
        )
        .await
        .map_err(E2eError::api(format!("creating {probe}")))?;
        let done = wait_pod(pods, &probe, &["Succeeded", "Failed"], PROBE_DONE).await?;
        let body = pods
            .logs(&probe, &LogParams::default())
            .await
            .map_err(E2eError::api(format!("logs of {probe}")))?;
        if pod_phase(&done) != "Succeeded" || body.trim() != servers[target].1 {
            return Err(E2eError::Check(format!(
                "{probe} on {node} -> {} ({}) on {}: phase {}, body {body:?}",
                servers[target].1,
                ips[target],
                servers[target].0,
                pod_phase(&done)
            )));
        }
    }
    Ok(servers)
}

/// The control-plane paths hvx needs besides pod-to-pod: the apiserver reaching
/// a pod (webhooks), a pod reaching the apiserver through the `kubernetes`
/// Service (the operator's in-cluster client), and cluster DNS.
async fn check_control_plane_paths(
    pods: &Api<Pod>,
    namespace: &str,
    server: &str,
    node: &str,
) -> Result<(), E2eError> {
    let path = apiserver_pod_proxy_path(namespace, server);
    let body = tools::run_kubectl(
        &kubeconfig::kubeconfig_from_env()?,
        &["get".to_string(), "--raw".to_string(), path.clone()],
    )?;
    if body.trim() != server {
        return Err(E2eError::Check(format!(
            "apiserver -> pod {server} via {path}: body {body:?}"
        )));
    }
    let image = test_image();
    let probes = [
        (
            apiserver_service_probe_pod("probe-apiserver-service", node, &image),
            "reach the kubernetes Service",
        ),
        (
            cluster_dns_probe_pod("probe-cluster-dns", node, &image),
            "resolve kubernetes.default.svc.cluster.local",
        ),
    ];
    for (pod, what) in probes {
        let probe = pod.metadata.name.clone().unwrap_or_default();
        pods.create(&PostParams::default(), &pod)
            .await
            .map_err(E2eError::api(format!("creating {probe}")))?;
        let done = wait_pod(pods, &probe, &["Succeeded", "Failed"], PROBE_DONE).await?;
        if pod_phase(&done) != "Succeeded" {
            let logs = pods
                .logs(&probe, &LogParams::default())
                .await
                .unwrap_or_default();
            return Err(E2eError::Check(format!(
                "pod on {node} could not {what}: {logs:?}"
            )));
        }
    }
    Ok(())
}

async fn check_drain(
    client: &Client,
    pods: &Api<Pod>,
    node: &str,
    pod: &str,
) -> Result<(), E2eError> {
    let out = tools::run_kubectl(
        &kubeconfig::kubeconfig_from_env()?,
        &tools::drain_args(node, DRAIN_SECS),
    )?;
    println!("kubectl drain {node}:\n{out}");
    wait_until(
        &format!("pod {pod} evicted from {node}"),
        Duration::from_secs(60),
        POLL,
        || async move {
            Ok(
                match pods
                    .get_opt(pod)
                    .await
                    .map_err(E2eError::api(format!("getting {pod}")))?
                {
                    None => Poll::Done(()),
                    Some(p) => Poll::NotYet(format!("still there, phase {}", pod_phase(&p))),
                },
            )
        },
    )
    .await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let drained = nodes
        .get(node)
        .await
        .map_err(E2eError::api(format!("getting node {node}")))?;
    if !node_is_cordoned(&drained) {
        return Err(E2eError::Check(format!(
            "{node} is not cordoned after drain"
        )));
    }
    Ok(())
}

async fn uncordon(client: &Client, node: &str) -> Result<(), E2eError> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": null}})),
        )
        .await
        .map_err(E2eError::api(format!("uncordoning {node}")))?;
    Ok(())
}

async fn smoke(
    client: &Client,
    namespace: &str,
    drained: &mut Option<String>,
) -> Result<(), E2eError> {
    let nodes = ready_nodes(client).await?;
    let schedulable: Vec<String> = nodes
        .iter()
        .filter(|n| node_is_schedulable(n))
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    println!("{} Ready nodes; schedulable: {schedulable:?}", nodes.len());
    if schedulable.len() < 2 {
        return Err(E2eError::Check(format!(
            "need at least 2 schedulable nodes for cross-node traffic, have {schedulable:?}"
        )));
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(&PostParams::default(), &test_namespace(namespace))
        .await
        .map_err(E2eError::api(format!("creating namespace {namespace}")))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let servers = check_cross_node_traffic(&pods, &schedulable).await?;
    println!("cross-node HTTP ok between {servers:?}");
    let (first_node, first_server) = servers.first().cloned().unwrap_or_default();
    check_control_plane_paths(&pods, namespace, &first_server, &first_node).await?;
    println!("apiserver -> pod, pod -> kubernetes Service and cluster DNS ok");

    let (node, pod) = servers.last().cloned().unwrap_or_default();
    *drained = Some(node.clone());
    check_drain(client, &pods, &node, &pod).await?;
    println!("drain of {node} evicted {pod} and cordoned the node");
    Ok(())
}

#[tokio::test]
async fn nodes_ready_pods_talk_across_nodes_and_drain_evicts() {
    let client = match kubeconfig::client_from_env().await {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let namespace = unique_namespace();
    let mut drained = None;
    let result = smoke(&client, &namespace, &mut drained).await;

    // Clean up whatever happened above, then report.
    let mut cleanup = Vec::new();
    if let Some(node) = &drained
        && let Err(e) = uncordon(&client, node).await
    {
        cleanup.push(e.to_string());
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if let Err(e) = namespaces
        .delete(&namespace, &DeleteParams::background())
        .await
    {
        cleanup.push(format!("deleting namespace {namespace}: {e}"));
    }
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(cleanup.is_empty(), "cleanup failed: {cleanup:?}");
}

/// Runs cluster-down twice and checks independently that no process, network
/// namespace, mount or bridge of the local harness is left.
#[test]
#[ignore = "destroys the local cluster: make cluster-down-check"]
fn cluster_down_leaves_nothing() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let state_dir =
        std::env::var("HVX_CLUSTER_DIR").unwrap_or_else(|_| "/var/lib/hvx-cluster".to_string());
    // Processes of the run are those started after `make test` began (its marker),
    // else after the cluster was made; read before cluster-down removes the dir.
    let since = run_started(&repo, &state_dir);
    for round in 1..=2 {
        let status = std::process::Command::new(repo.join("e2e/harness/cluster-down.sh")).status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "cluster-down round {round}: {status:?}"
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let ours: Vec<&str> = mounts.lines().filter(|l| l.contains(&state_dir)).collect();
    assert!(ours.is_empty(), "mounts left: {ours:?}");
    let netns = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                // The harness's nodes, and networks' gateway namespaces (named in
                // the agents' containers; here only if an agent ran outside one).
                .filter(|n| n.starts_with("hvx-node-") || n.starts_with("hvx-n-"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(netns.is_empty(), "network namespaces left: {netns:?}");
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&state_dir) {
            procs.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    assert!(procs.is_empty(), "processes left: {procs:?}");
    if let Some(since) = since {
        let left = started_since(since, LEAK_KINDS);
        assert!(
            left.is_empty(),
            "processes started by this run are still running (an orphaned probe QEMU, \
             conversion, dnsmasq, shim or kubelet): {left:?}"
        );
    }
    assert!(
        !std::path::Path::new("/sys/class/net/hvxbr0").exists(),
        "bridge hvxbr0 left"
    );
    assert!(
        !std::path::Path::new(&state_dir).exists(),
        "{state_dir} left"
    );
}

/// Kernel command names (`/proc/<pid>/comm`, at most 15 bytes) of what a run starts
/// and must not leave: QEMU, qemu-img, dnsmasq, containerd and its shims, kubelets,
/// hvx agents and launchers.
const LEAK_KINDS: &[&str] = &[
    "qemu-system-x86",
    "qemu-img",
    "dnsmasq",
    "containerd",
    "containerd-shim",
    "kubelet",
    "hvx-node-agent",
    "hvx-launcher",
];

/// Seconds since the epoch when the run began: `_out/test-started` (written first
/// by `make test`), else the cluster state dir's mtime, else none.
fn run_started(repo: &std::path::Path, state_dir: &str) -> Option<u64> {
    let marker = repo.join("_out/test-started");
    if let Some(t) = std::fs::read_to_string(&marker)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return Some(t);
    }
    std::fs::metadata(state_dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
}

/// "pid comm: args" of live processes of `kinds` that started at or after `since`.
fn started_since(since: u64, kinds: &[&str]) -> Vec<String> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(btime) = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return vec!["cannot read the boot time from /proc/stat".into()];
    };
    let tck: u64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100);
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !kinds.contains(&comm.trim()) {
            continue;
        }
        let Some(fields) = std::fs::read_to_string(path.join("stat"))
            .ok()
            .and_then(|s| s.rfind(')').map(|i| s[i + 1..].to_string()))
        else {
            continue;
        };
        let f: Vec<&str> = fields.split_whitespace().collect();
        let start = f.get(19).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0) / tck.max(1);
        if f.first() == Some(&"Z") || btime + start < since {
            continue;
        }
        let args = std::fs::read(path.join("cmdline")).unwrap_or_default();
        out.push(format!(
            "{} {}: {}",
            entry.file_name().to_string_lossy(),
            comm.trim(),
            String::from_utf8_lossy(&args).replace('\0', " ")
        ));
    }
    out
}

#[test]
fn leak_check_finds_a_process_started_after_the_mark_only() {
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    std::thread::sleep(Duration::from_millis(50));
    let pid = child.id().to_string();
    let found = started_since(before.saturating_sub(1), &["sleep"]);
    let later = started_since(before + 3600, &["sleep"]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        found.iter().any(|l| l.starts_with(&format!("{pid} "))),
        "{found:?}"
    );
    assert!(
        !later.iter().any(|l| l.starts_with(&format!("{pid} "))),
        "{later:?}"
    );
}

#[test]
fn bench_refuses_to_start_beside_a_stray_qemu_img() {
    // A process the kernel calls `qemu-img` (a copy of sleep under that name).
    let dir = tempfile::tempdir().expect("tmp");
    let fake = dir.path().join("qemu-img");
    std::fs::copy("/bin/sleep", &fake).expect("copy sleep");
    let mut stray = std::process::Command::new(&fake)
        .arg("60")
        .spawn()
        .expect("fake qemu-img");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("bash")
        .arg(repo.join("bench/run.sh"))
        .env("BENCH_ONLY", "no-such-benchmark")
        .env_remove("BENCH_ALLOW_STRAYS")
        .output()
        .expect("bench/run.sh");
    let _ = stray.kill();
    let _ = stray.wait();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("pid {} qemu-img", stray.id())),
        "the stray is not named: {err}"
    );
}
