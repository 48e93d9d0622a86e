//! Node labels the scheduler places VMs by: `hvx.dev/agent=ready` once this agent
//! serves and knows its accelerator, `hvx.dev/accelerator=kvm|tcg`; and the one the
//! operator allows post-copy migrations by, `hvx.dev/post-copy=true|false`.

use std::time::Duration;

/// Label: the agent serves.
pub const AGENT: &str = "hvx.dev/agent";
/// Label: the accelerator the probe found.
pub const ACCELERATOR: &str = "hvx.dev/accelerator";

/// Label: whether this node's QEMU takes post-copy migrations.
pub const POST_COPY: &str = "hvx.dev/post-copy";

/// The merge patch setting the three labels.
pub fn patch(accel: &str, post_copy: bool) -> serde_json::Value {
    serde_json::json!({"metadata": {"labels": {
        AGENT: "ready", ACCELERATOR: accel, POST_COPY: post_copy.to_string()
    }}})
}

/// Labels `node`, retrying with backoff (up to a minute apart) until it works.
pub async fn label_node(node: &str, accel: &str, post_copy: bool) {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, Patch, PatchParams};
    let mut delay = Duration::from_secs(1);
    loop {
        let result = async {
            let client = kube::Client::try_default().await?;
            let nodes: Api<Node> = Api::all(client);
            nodes
                .patch(
                    node,
                    &PatchParams::default(),
                    &Patch::Merge(&patch(accel, post_copy)),
                )
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
    fn patch_sets_our_labels_only() {
        let p = super::patch("tcg", true);
        assert_eq!(p["metadata"]["labels"]["hvx.dev/agent"], "ready");
        assert_eq!(p["metadata"]["labels"]["hvx.dev/accelerator"], "tcg");
        assert_eq!(p["metadata"]["labels"]["hvx.dev/post-copy"], "true");
        assert_eq!(
            super::patch("kvm", false)["metadata"]["labels"]["hvx.dev/post-copy"],
            "false"
        );
        assert_eq!(
            p["metadata"]["labels"].as_object().map(|o| o.len()),
            Some(3)
        );
        assert_eq!(p.as_object().map(|o| o.len()), Some(1));
    }
}
