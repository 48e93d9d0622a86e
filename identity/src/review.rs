//! Who is asking for an agent certificate: a TokenReview of the ServiceAccount token
//! the agent presents, and the checks on its answer.

use crate::{AGENT_SERVICE_ACCOUNT, Error, NODE_NAME_EXTRA, TOKEN_AUDIENCE, valid_node_name};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

/// Asks the API server who `token` belongs to, for the audience agents request their
/// tokens for.
pub async fn review(client: &kube::Client, token: &str) -> Result<TokenReviewStatus, Error> {
    let api: Api<TokenReview> = Api::all(client.clone());
    let req = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
        },
        ..Default::default()
    };
    let done = api
        .create(&PostParams::default(), &req)
        .await
        .map_err(|e| Error::Kube(format!("TokenReview: {e}")))?;
    done.status
        .ok_or_else(|| Error::Kube("TokenReview answered without a status".into()))
}

/// The node whose agent presented a token, from its review: the token must be
/// authenticated, for the `hvx-operator` audience, of the agent ServiceAccount in
/// `namespace`, and bound to a pod on a node (the API server's
/// `authentication.kubernetes.io/node-name` extra). The node is never taken from the
/// request itself.
pub fn node_of(status: &TokenReviewStatus, namespace: &str) -> Result<String, Error> {
    if status.authenticated != Some(true) {
        return Err(Error::TokenRefused(format!(
            "not authenticated{}",
            status
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )));
    }
    if !status
        .audiences
        .iter()
        .flatten()
        .any(|a| a == TOKEN_AUDIENCE)
    {
        return Err(Error::TokenRefused(format!(
            "not issued for audience {TOKEN_AUDIENCE} (audiences {:?})",
            status.audiences.as_deref().unwrap_or_default()
        )));
    }
    let user = status
        .user
        .as_ref()
        .ok_or_else(|| Error::TokenRefused("no user in the review".into()))?;
    let want = format!("system:serviceaccount:{namespace}:{AGENT_SERVICE_ACCOUNT}");
    let username = user.username.as_deref().unwrap_or_default();
    if username != want {
        return Err(Error::TokenRefused(format!(
            "{username:?} is not the agent ServiceAccount {want}"
        )));
    }
    let nodes = user
        .extra
        .as_ref()
        .and_then(|e| e.get(NODE_NAME_EXTRA))
        .cloned()
        .unwrap_or_default();
    match nodes.as_slice() {
        [node] if valid_node_name(node) => Ok(node.clone()),
        [] => Err(Error::TokenRefused(format!(
            "no {NODE_NAME_EXTRA} in the token: use a projected token of a pod scheduled on a node"
        ))),
        other => Err(Error::TokenRefused(format!(
            "{NODE_NAME_EXTRA} is {other:?}, not one node name"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn status(user: &str, audiences: &[&str], node: Option<&str>) -> TokenReviewStatus {
        let mut extra = BTreeMap::new();
        if let Some(n) = node {
            extra.insert(NODE_NAME_EXTRA.to_string(), vec![n.to_string()]);
        }
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.to_string()),
                extra: Some(extra),
                ..Default::default()
            }),
            error: None,
        }
    }

    const AGENT: &str = "system:serviceaccount:hvx-system:hvx-agent";

    #[test]
    fn an_agent_token_names_its_node() {
        let s = status(AGENT, &["hvx-operator"], Some("worker-1"));
        assert_eq!(node_of(&s, "hvx-system").expect("accepted"), "worker-1");
    }

    #[test]
    fn refusals_say_why() {
        let cases = [
            (
                status(
                    "system:serviceaccount:tenant:hvx-agent",
                    &["hvx-operator"],
                    Some("w"),
                ),
                "not the agent ServiceAccount",
            ),
            (
                status(
                    "system:serviceaccount:hvx-system:default",
                    &["hvx-operator"],
                    Some("w"),
                ),
                "not the agent ServiceAccount",
            ),
            (
                status(AGENT, &["https://kubernetes.default.svc"], Some("w")),
                "audience",
            ),
            (status(AGENT, &[], Some("w")), "audience"),
            (
                status(AGENT, &["hvx-operator"], None),
                "no authentication.kubernetes.io/node-name",
            ),
            (
                status(AGENT, &["hvx-operator"], Some("Bad_Node")),
                "not one node name",
            ),
        ];
        for (s, why) in cases {
            let e = node_of(&s, "hvx-system").expect_err("refused").to_string();
            assert!(e.contains(why), "{e} should say {why}");
        }
        let mut two = status(AGENT, &["hvx-operator"], Some("a"));
        if let Some(extra) = two.user.as_mut().and_then(|u| u.extra.as_mut()) {
            extra.insert(NODE_NAME_EXTRA.into(), vec!["a".into(), "b".into()]);
        }
        assert!(node_of(&two, "hvx-system").is_err());

        let unauth = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token expired".into()),
            ..Default::default()
        };
        let e = node_of(&unauth, "hvx-system")
            .expect_err("refused")
            .to_string();
        assert!(e.contains("not authenticated: token expired"), "{e}");
        assert!(node_of(&TokenReviewStatus::default(), "hvx-system").is_err());
    }
}
