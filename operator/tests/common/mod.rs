//! What the operator's reconciler tests share: caches filled by hand, a context over a
//! mocked API server, a permissive API server that records what a pass asks, and fake
//! node agents serving the real gRPC contract on loopback.
//!
//! Each test binary uses a part of it.
#![allow(dead_code)]

pub mod agents;

use http::{Method, Request, Response};
use hvx_operator::context::{Context, OperatorConfig};
use hvx_operator::stores::Stores;
use k8s_openapi::api::core::v1::Node;
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};
use std::sync::Arc;
use tower_test::mock::{self, Handle};

/// The API server side of a mocked client.
pub type ApiHandle = Handle<Request<Body>, Response<Body>>;
/// What a pass asked of the API server: method, path and body of each request.
pub type Requests = Vec<(Method, String, Value)>;

/// A store already filled with `objs` (and marked ready).
pub fn store_of<K>(objs: Vec<K>) -> reflector::Store<K>
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

/// A node whose agent reported ready, at `ip`, its kubelet's Ready condition `ready`.
pub fn agent_node(name: &str, ip: &str, ready: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"hvx.dev/agent": "ready"}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}],
                   "conditions": [{"type": "Ready", "status": ready,
                                   "lastHeartbeatTime": "2026-12-07T10:00:00Z"}]}
    }))
    .expect("node")
}

/// An operator's context over `stores` and a mocked API server (its handle returned).
pub fn operator_context(stores: Stores, config: OperatorConfig) -> (Arc<Context>, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
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

/// Answers one request with `body` (200).
pub fn respond(send: mock::SendResponse<Response<Body>>, body: &Value) {
    send.send_response(
        Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(body).expect("json")))
            .expect("response"),
    );
}

/// A request's JSON body, or null.
pub async fn body_json_or_null(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

/// A permissive API server: a write to the path of `own`'s kind answers `own` (a merge
/// patch's nulls are not an object), other writes their own body, GETs answer `lists`
/// by path prefix (else an empty list), DELETEs a Status. Records every request until
/// the client is dropped.
pub fn serve(
    handle: ApiHandle,
    own: Value,
    lists: Vec<(&'static str, Value)>,
) -> tokio::task::JoinHandle<Requests> {
    serve_refusing(handle, own, lists, Vec::new())
}

/// [`serve`], except that a request of `refusals`' method and path gets their
/// Status (whose `code` is the HTTP status), as an admission plugin would answer.
pub fn serve_refusing(
    mut handle: ApiHandle,
    own: Value,
    lists: Vec<(&'static str, Value)>,
    refusals: Vec<(Method, &'static str, Value)>,
) -> tokio::task::JoinHandle<Requests> {
    let own_path = format!(
        "/{}s/",
        own["kind"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase()
    );
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            let body = body_json_or_null(req).await;
            if let Some((_, _, status)) =
                refusals.iter().find(|(m, p, _)| *m == method && *p == path)
            {
                let code = status["code"].as_u64().and_then(|c| u16::try_from(c).ok());
                send.send_response(
                    Response::builder()
                        .status(code.unwrap_or(500))
                        .body(Body::from(serde_json::to_vec(status).expect("json")))
                        .expect("response"),
                );
                seen.push((method, path, body));
                continue;
            }
            let mut answer = if method == Method::GET {
                lists
                    .iter()
                    .find(|(p, _)| path.starts_with(p))
                    .map(|(_, l)| l.clone())
                    .unwrap_or_else(|| json!({"metadata": {}, "items": []}))
            } else if method == Method::DELETE {
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})
            } else if path.contains(&own_path) {
                own.clone()
            } else {
                body.clone()
            };
            if answer.get("metadata").is_none() {
                answer["metadata"] = json!({"name": "x"});
            }
            respond(send, &answer);
            seen.push((method, path, body));
        }
        seen
    })
}
