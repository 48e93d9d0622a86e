//! Node labels the scheduler places VMs by: `hvx.dev/agent=ready` once this agent
//! serves and knows its accelerator, `hvx.dev/accelerator=kvm|tcg`.

use std::time::Duration;

/// Label: the agent serves.
pub const AGENT: &str = "hvx.dev/agent";
/// Label: the accelerator the probe found.
pub const ACCELERATOR: &str = "hvx.dev/accelerator";

/// The merge patch setting both labels.
pub fn patch(accel: &str) -> serde_json::Value {
    serde_json::json!({"metadata": {"labels": {AGENT: "ready", ACCELERATOR: accel}}})
}

/// Labels `node`, retrying with backoff (up to a minute apart) until it works.
pub async fn label_node(node: &str, accel: &str) {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, Patch, PatchParams};
    let mut delay = Duration::from_secs(1);
    loop {
        let result = async {
            let client = kube::Client::try_default().await?;
            let nodes: Api<Node> = Api::all(client);
            nodes
                .patch(node, &PatchParams::default(), &Patch::Merge(&patch(accel)))
                .await?;
            Ok::<_, kube::Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(node, accel, "node labelled {AGENT}=ready");
                return;
            }
            Err(e) => {
                tracing::warn!(node, error = %e, "labelling the node; retrying in {}s", delay.as_secs());
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn patch_sets_both_labels_only() {
        let p = super::patch("tcg");
        assert_eq!(p["metadata"]["labels"]["hvx.dev/agent"], "ready");
        assert_eq!(p["metadata"]["labels"]["hvx.dev/accelerator"], "tcg");
        assert_eq!(p.as_object().map(|o| o.len()), Some(1));
    }
}
