//! Pure helpers: read state off Kubernetes objects and build the small test
//! objects the cluster tests create.

use k8s_openapi::api::core::v1::{Container, Namespace, Node, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;

/// Test image: busybox-static, built locally by the harness (no registry) and
/// loaded into kind by e2e-kind.sh. Override with `HVX_E2E_TEST_IMAGE`.
pub const DEFAULT_TEST_IMAGE: &str = "localhost/hvx-e2e-busybox:1";
/// Port the test HTTP server pods listen on.
pub const HTTP_PORT: u16 = 8080;
const TEST_LABEL: &str = "hvx.dev/e2e";

pub fn test_image() -> String {
    std::env::var("HVX_E2E_TEST_IMAGE").unwrap_or_else(|_| DEFAULT_TEST_IMAGE.to_string())
}

pub fn node_is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Ready, not cordoned and without NoSchedule/NoExecute taints (kind's control
/// plane is tainted): a node a plain test pod may run on.
pub fn node_is_schedulable(node: &Node) -> bool {
    let spec = node.spec.as_ref();
    let cordoned = spec.and_then(|s| s.unschedulable).unwrap_or(false);
    let tainted = spec.and_then(|s| s.taints.as_ref()).is_some_and(|ts| {
        ts.iter()
            .any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
    });
    node_is_ready(node) && !cordoned && !tainted
}

pub fn node_is_cordoned(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

pub fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Unknown")
}

pub fn pod_ip(pod: &Pod) -> Option<&str> {
    pod.status.as_ref().and_then(|s| s.pod_ip.as_deref())
}

pub fn pod_node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

pub fn test_namespace(name: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(
                TEST_LABEL.to_string(),
                "true".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

fn pinned_pod(name: &str, node: &str, image: &str, script: String, restart: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(TEST_LABEL.to_string(), name.to_string())])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            // Pinned by nodeName: the test decides placement, not the scheduler.
            node_name: Some(node.to_string()),
            restart_policy: Some(restart.to_string()),
            termination_grace_period_seconds: Some(1),
            automount_service_account_token: Some(false),
            containers: vec![Container {
                name: "main".to_string(),
                image: Some(image.to_string()),
                image_pull_policy: Some("Never".to_string()),
                command: Some(vec!["/bin/sh".to_string(), "-c".to_string(), script]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// A pod on `node` serving its own name over HTTP on `HTTP_PORT`.
pub fn http_server_pod(name: &str, node: &str, image: &str) -> Pod {
    let script = format!(
        "mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p {HTTP_PORT} -h /www"
    );
    pinned_pod(name, node, image, script, "Always")
}

/// A pod on `node` that fetches `http://target_ip:HTTP_PORT/` once (retrying for
/// up to ~90 s while routes settle) and prints the body; it succeeds only if the
/// fetch did. (`timeout` rather than wget's own `-T`: busybox-static's wget
/// crashes with `-T`.)
pub fn http_probe_pod(name: &str, node: &str, image: &str, target_ip: &str) -> Pod {
    let script = format!(
        "for i in $(seq 1 30); do if timeout 3 wget -q -O - http://{target_ip}:{HTTP_PORT}/; then exit 0; fi; sleep 2; done; exit 1"
    );
    pinned_pod(name, node, image, script, "Never")
}

/// A pod on `node` that opens a TCP connection to the `kubernetes` Service
/// (the address in-cluster clients such as the operator use) and succeeds only
/// if that works: checks kube-proxy and pod-to-apiserver routing.
pub fn apiserver_service_probe_pod(name: &str, node: &str, image: &str) -> Pod {
    let script = "for i in $(seq 1 30); do \
if echo | timeout 3 nc \"$KUBERNETES_SERVICE_HOST\" \"$KUBERNETES_SERVICE_PORT\"; then echo connected; exit 0; fi; \
sleep 2; done; exit 1"
        .to_string();
    pinned_pod(name, node, image, script, "Never")
}

/// A pod on `node` that resolves the `kubernetes` Service by its cluster DNS
/// name and succeeds only if the answer is the Service's address.
pub fn cluster_dns_probe_pod(name: &str, node: &str, image: &str) -> Pod {
    let script = "for i in $(seq 1 30); do \
if nslookup kubernetes.default.svc.cluster.local | grep -q \"$KUBERNETES_SERVICE_HOST\"; then echo resolved; exit 0; fi; \
sleep 2; done; nslookup kubernetes.default.svc.cluster.local; exit 1"
        .to_string();
    pinned_pod(name, node, image, script, "Never")
}

/// Path of the apiserver's proxy to `pod`'s HTTP port: the apiserver dials the
/// pod IP itself, the same path admission webhook calls take.
pub fn apiserver_pod_proxy_path(namespace: &str, pod: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/pods/{pod}:{HTTP_PORT}/proxy/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus, Taint};

    fn node(ready: &str, unschedulable: bool, taint: Option<&str>) -> Node {
        Node {
            spec: Some(NodeSpec {
                unschedulable: Some(unschedulable),
                taints: taint.map(|effect| {
                    vec![Taint {
                        effect: effect.to_string(),
                        key: "k".to_string(),
                        ..Taint::default()
                    }]
                }),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".to_string(),
                    status: ready.to_string(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn readiness_and_schedulability() {
        assert!(node_is_ready(&node("True", false, None)));
        assert!(!node_is_ready(&node("False", false, None)));
        assert!(!node_is_ready(&Node::default()));
        assert!(node_is_schedulable(&node(
            "True",
            false,
            Some("PreferNoSchedule")
        )));
        assert!(!node_is_schedulable(&node("True", true, None)));
        assert!(!node_is_schedulable(&node(
            "True",
            false,
            Some("NoSchedule")
        )));
        assert!(!node_is_schedulable(&node("False", false, None)));
        assert!(node_is_cordoned(&node("True", true, None)));
    }

    #[test]
    fn test_pods_are_pinned_and_never_pull() {
        let pod = http_server_pod("srv-1", "n1", "img:1");
        assert_eq!(pod_node(&pod), Some("n1"));
        let spec = pod.spec.unwrap_or_default();
        let c = &spec.containers[0];
        assert_eq!(c.image_pull_policy.as_deref(), Some("Never"));
        assert!(
            c.command
                .as_ref()
                .is_some_and(|cmd| cmd[2].contains("httpd -f -p 8080"))
        );
        let probe = http_probe_pod("probe-1", "n2", "img:1", "10.0.0.7");
        let cmd = probe
            .spec
            .and_then(|s| s.containers[0].command.clone())
            .unwrap_or_default();
        assert!(cmd[2].contains("http://10.0.0.7:8080/"));
        assert_eq!(pod_phase(&Pod::default()), "Unknown");
        let svc = apiserver_service_probe_pod("svc", "n3", "img:1");
        let cmd = svc
            .spec
            .and_then(|s| s.containers[0].command.clone())
            .unwrap_or_default();
        assert!(cmd[2].contains("nc \"$KUBERNETES_SERVICE_HOST\" \"$KUBERNETES_SERVICE_PORT\""));
        let dns = cluster_dns_probe_pod("dns", "n1", "img:1");
        let cmd = dns
            .spec
            .and_then(|s| s.containers[0].command.clone())
            .unwrap_or_default();
        assert!(cmd[2].contains("nslookup kubernetes.default.svc.cluster.local"));
        assert_eq!(
            apiserver_pod_proxy_path("ns", "srv-0"),
            "/api/v1/namespaces/ns/pods/srv-0:8080/proxy/"
        );
    }
}
