//! This node's liveness Lease: `hvx-agent-<node>` (coordination.k8s.io/v1) in the hvx
//! namespace, renewed every quarter of its duration. The operator declares a node
//! lost only when this Lease and the Node's Ready condition both stopped (see the
//! operator's `liveness`), and then records the cleanup owed to the node instead of
//! waiting for it. A ValidatingAdmissionPolicy (charts/hvx/templates/node-restriction.yaml)
//! lets an agent write only the Lease of the node its pod-bound token names.

use std::time::Duration;

/// Prefix of the Lease name (the operator's `liveness::LEASE_PREFIX`).
pub const PREFIX: &str = "hvx-agent-";
/// Label the operator watches the agents' Leases by.
pub const LABEL: &str = "hvx.dev/agent-lease";
/// How long the Lease is valid without renewal, seconds (the operator's default
/// `--node-lease-seconds`; it honours a longer one).
pub const DURATION_SECONDS: i32 = 20;

/// The Lease name of `node`; `None` when it would be too long for an object name.
pub fn name(node: &str) -> Option<String> {
    let name = format!("{PREFIX}{node}");
    (name.len() <= 253).then_some(name)
}

/// The renewal: holder, duration and renew time (a merge patch).
pub fn renewal(node: &str, now: k8s_openapi::jiff::Timestamp) -> serde_json::Value {
    serde_json::json!({"spec": {
        "holderIdentity": node,
        "leaseDurationSeconds": DURATION_SECONDS,
        "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
    }})
}

/// The whole Lease, for its first creation.
pub fn lease(
    node: &str,
    namespace: &str,
    now: k8s_openapi::jiff::Timestamp,
) -> Option<serde_json::Value> {
    let mut l = renewal(node, now);
    l["apiVersion"] = "coordination.k8s.io/v1".into();
    l["kind"] = "Lease".into();
    l["metadata"] = serde_json::json!({
        "name": name(node)?, "namespace": namespace, "labels": {LABEL: "true"},
    });
    l["spec"]["acquireTime"] = l["spec"]["renewTime"].clone();
    Some(l)
}

/// Renews the Lease for as long as the agent runs (creating it when absent). Failures
/// are logged (the first, then every minute) and retried at the next renewal.
pub async fn renew_forever(node: String, namespace: String) {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let Some(lease_name) = name(&node) else {
        tracing::warn!(%node, "node name too long for a Lease name: the operator judges this node by its Node alone");
        return;
    };
    let every = Duration::from_secs((DURATION_SECONDS / 4).max(1) as u64);
    let mut failures = 0u32;
    let mut api: Option<Api<Lease>> = None;
    loop {
        let result = async {
            let leases = match &api {
                Some(a) => a.clone(),
                None => {
                    let a = Api::namespaced(kube::Client::try_default().await?, &namespace);
                    api = Some(a.clone());
                    a
                }
            };
            let now = k8s_openapi::jiff::Timestamp::now();
            match leases
                .patch(
                    &lease_name,
                    &PatchParams::default(),
                    &Patch::Merge(&renewal(&node, now)),
                )
                .await
            {
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    let body = lease(&node, &namespace, now).unwrap_or_default();
                    let l: Lease = serde_json::from_value(body).map_err(kube::Error::SerdeError)?;
                    match leases.create(&PostParams::default(), &l).await {
                        Ok(_) => Ok(()),
                        // Created meanwhile (a previous agent of this node): renewed next time.
                        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                other => other.map(|_| ()),
            }
        }
        .await;
        match result {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(lease = %lease_name, "liveness lease renewed again");
                }
                failures = 0;
            }
            Err(e) => {
                if failures.is_multiple_of(12) {
                    tracing::warn!(lease = %lease_name, error = %e, "renewing this node's liveness lease");
                }
                failures = failures.saturating_add(1);
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Deletes this node's Lease (the agent shuts down with nothing of hvx left on its
/// node: `helm uninstall`). Best effort.
pub async fn delete(node: &str, namespace: &str) {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::{Api, DeleteParams};
    let Some(lease_name) = name(node) else {
        return;
    };
    let result = async {
        let leases: Api<Lease> = Api::namespaced(kube::Client::try_default().await?, namespace);
        leases.delete(&lease_name, &DeleteParams::default()).await
    }
    .await;
    match result {
        Ok(_) => {
            tracing::info!(lease = %lease_name, "node holds no hvx state: liveness lease deleted")
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => {
            tracing::warn!(lease = %lease_name, error = %e, "deleting this node's liveness lease")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_names_its_node_and_renews_only_its_spec() {
        let now = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000)
            .unwrap_or_else(|e| panic!("{e}"));
        let l = lease("node-1", "hvx-system", now).unwrap_or_default();
        assert_eq!(l["metadata"]["name"], "hvx-agent-node-1");
        assert_eq!(l["metadata"]["labels"][LABEL], "true");
        assert_eq!(l["spec"]["holderIdentity"], "node-1");
        assert_eq!(l["spec"]["leaseDurationSeconds"], 20);
        assert_eq!(l["spec"]["renewTime"], l["spec"]["acquireTime"]);
        let parsed: k8s_openapi::api::coordination::v1::Lease =
            serde_json::from_value(l).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            parsed.spec.and_then(|s| s.renew_time).map(|t| t.0),
            Some(now)
        );
        let r = renewal("node-1", now);
        assert_eq!(r.as_object().map(|o| o.len()), Some(1), "spec only: {r}");
        assert!(lease(&"n".repeat(250), "hvx-system", now).is_none());
    }
}
