//! Agent identities end to end, in process and unprivileged (no cluster: the
//! TokenReview is a fake that answers as the API server would): the operator's
//! certificate endpoint signs the agent's CSR, the agent's real gRPC service serves
//! only the operator's identity, the operator reaches only the node it dials, and both
//! sides' certificates rotate while calls go on.

use hvx_identity::ca::{Ca, OperatorCredentials};
use hvx_identity::enroll::{CaSource, Enroller};
use hvx_identity::issuer::{OperatorTls, TokenReviewer};
use hvx_identity::{Error, NODE_NAME_EXTRA, agent_server_name, issuer_server_name, pem};
use hvx_node_agent::agent::{Agent, AgentConfig, server::AgentService};
use hvx_proto::v1 as pb;
use hvx_proto::v1::node_agent_client::NodeAgentClient;
use hvx_proto::v1::node_agent_server::NodeAgentServer;
use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const NS: &str = "hvx-system";
const NODE: &str = "test-node";
const HOUR: Duration = Duration::from_secs(3600);

/// Answers as the API server would for three tokens: this node's agent, another
/// node's agent, a tenant's ServiceAccount; anything else is unauthenticated.
struct FakeReviews;

impl TokenReviewer for FakeReviews {
    fn review<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<TokenReviewStatus, Error>> + Send + 'a>> {
        let (user, node) = match token {
            "agent-token" => (format!("system:serviceaccount:{NS}:hvx-agent"), NODE),
            "other-node-token" => (format!("system:serviceaccount:{NS}:hvx-agent"), "node-b"),
            "tenant-token" => ("system:serviceaccount:tenant:default".to_string(), NODE),
            _ => {
                return Box::pin(async {
                    Ok(TokenReviewStatus {
                        authenticated: Some(false),
                        error: Some("invalid bearer token".into()),
                        ..Default::default()
                    })
                });
            }
        };
        let extra = BTreeMap::from([(NODE_NAME_EXTRA.to_string(), vec![node.to_string()])]);
        Box::pin(async move {
            Ok(TokenReviewStatus {
                authenticated: Some(true),
                audiences: Some(vec!["hvx-operator".into()]),
                user: Some(UserInfo {
                    username: Some(user),
                    extra: Some(extra),
                    ..Default::default()
                }),
                error: None,
            })
        })
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

/// The serial of the certificate the agent at `port` presents to a new connection
/// made with `client` (the operator's identity).
async fn served_serial(port: u16, creds: &hvx_identity::ca::Credentials) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for c in pem::certs("ca", creds.ca_pem.as_bytes()).expect("ca") {
        roots.add(c).expect("root");
    }
    let chain = pem::certs("crt", creds.identity.cert_pem.as_bytes()).expect("crt");
    let key = pem::private_key("key", creds.identity.key_pem.as_bytes()).expect("key");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client auth");
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from(agent_server_name(NODE)).expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("handshake");
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("server certificate");
    pem::cert_info(&certs[0]).expect("info").serial
}

fn operator_tls(creds: &hvx_identity::ca::Credentials, dial: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .domain_name(agent_server_name(dial))
        .ca_certificate(Certificate::from_pem(&creds.ca_pem))
        .identity(Identity::from_pem(
            &creds.identity.cert_pem,
            &creds.identity.key_pem,
        ))
}

async fn connect(port: u16, tls: ClientTlsConfig) -> Result<NodeAgentClient<Channel>, String> {
    let ch = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(NodeAgentClient::new(ch))
}

/// Whether a client with `tls` is served a GetCapabilities.
async fn served(port: u16, tls: ClientTlsConfig) -> bool {
    match connect(port, tls).await {
        Err(_) => false,
        Ok(mut c) => c
            .get_capabilities(pb::GetCapabilitiesRequest {})
            .await
            .is_ok(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_node_certificates_serve_only_the_operator_and_rotate_live() {
    hvx_identity::install_crypto_provider();
    let tmp = tempfile::tempdir().expect("tmp");
    let ca_dir = tmp.path().join("ca");
    std::fs::create_dir_all(&ca_dir).expect("mkdir");
    let (ca, ca_files) = Ca::generate("hvx-ca").expect("ca");
    write(&ca_dir.join("tls.crt"), &ca_files.cert_pem);
    write(&ca_dir.join("tls.key"), &ca_files.key_pem);
    write(&ca_dir.join("ca.crt"), &ca_files.cert_pem);

    // The operator: its certificates and the endpoint.
    let op = Arc::new(OperatorTls::load(ca_dir.clone(), NS, HOUR).expect("operator TLS"));
    let issuer_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let issuer_port = issuer_listener.local_addr().expect("addr").port();
    tokio::spawn(hvx_identity::issuer::serve(
        issuer_listener,
        op.clone(),
        Arc::new(FakeReviews),
    ));

    // The agent asks for its certificate.
    let agent_tls = tmp.path().join("agent-tls");
    let token_file = tmp.path().join("token");
    let enroller = |token: &str, node: &str| {
        write(&token_file, token);
        Enroller {
            dir: agent_tls.clone(),
            node: node.to_string(),
            url: format!("https://127.0.0.1:{issuer_port}"),
            server_name: Some(issuer_server_name(NS)),
            token_file: token_file.clone(),
            ca: CaSource::File(ca_dir.join("ca.crt")),
        }
    };
    // Refusals first: nothing is written for them.
    for (token, node, why) in [
        ("forged", NODE, "not authenticated"),
        ("tenant-token", NODE, "not the agent ServiceAccount"),
        (
            "other-node-token",
            NODE,
            "the agent of node node-b may have only node-b.agent.hvx",
        ),
    ] {
        let e = enroller(token, node)
            .enroll_once()
            .await
            .expect_err("refused")
            .to_string();
        assert!(e.contains("HTTP 403") && e.contains(why), "{token}: {e}");
    }
    assert!(!agent_tls.join("tls.crt").exists());
    // A client that does not trust the operator's CA never sends its token.
    let mut wrong_ca = enroller("agent-token", NODE);
    let (_, other_files) = Ca::generate("other-ca").expect("ca");
    let other_ca_file = tmp.path().join("other-ca.crt");
    write(&other_ca_file, &other_files.cert_pem);
    wrong_ca.ca = CaSource::File(other_ca_file);
    let e = wrong_ca
        .enroll_once()
        .await
        .expect_err("refused")
        .to_string();
    assert!(e.contains("TLS"), "{e}");

    let enroll = enroller("agent-token", NODE);
    let first = enroll.enroll_once().await.expect("issued");
    assert_eq!(first.dns_names, [agent_server_name(NODE)]);
    assert!(first.server_auth && !first.client_auth);

    // The agent's real gRPC service behind the identity checks.
    let agent = Agent::open(AgentConfig::new(
        NODE,
        std::net::Ipv4Addr::LOCALHOST,
        tmp.path().join("store"),
        tmp.path().join("run"),
    ))
    .expect("agent");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let config = hvx_identity::verify::agent_server_config(&agent_tls).expect("config");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeAgentServer::new(AgentService {
                agent: Arc::new(agent),
            }))
            .serve_with_incoming(hvx_identity::verify::incoming(listener, config)),
    );

    let creds = op.credentials.current();
    assert!(
        served(port, operator_tls(&creds, NODE)).await,
        "the operator is served"
    );

    // The operator dialling another node's agent at this address is refused by its
    // own check: this certificate does not name node-b.
    assert!(!served(port, operator_tls(&creds, "node-b")).await);

    // An agent's identity presented as a client: refused.
    let agent_as_client = ClientTlsConfig::new()
        .domain_name(agent_server_name(NODE))
        .ca_certificate(Certificate::from_pem(&creds.ca_pem))
        .identity(Identity::from_pem(
            std::fs::read(agent_tls.join("tls.crt")).expect("crt"),
            std::fs::read(agent_tls.join("tls.key")).expect("key"),
        ));
    assert!(
        !served(port, agent_as_client).await,
        "an agent identity was served"
    );

    // An operator identity from another CA: refused.
    let (other, _) = Ca::generate("other-ca").expect("ca");
    let foreign = OperatorCredentials::new(&other, HOUR)
        .expect("creds")
        .current();
    let foreign_tls = ClientTlsConfig::new()
        .domain_name(agent_server_name(NODE))
        .ca_certificate(Certificate::from_pem(&creds.ca_pem))
        .identity(Identity::from_pem(
            &foreign.identity.cert_pem,
            &foreign.identity.key_pem,
        ));
    assert!(
        !served(port, foreign_tls).await,
        "another CA's operator was served"
    );

    // No client certificate at all: refused.
    let anonymous = ClientTlsConfig::new()
        .domain_name(agent_server_name(NODE))
        .ca_certificate(Certificate::from_pem(&creds.ca_pem));
    assert!(!served(port, anonymous).await);

    // Rotation while calls go on over an open connection.
    assert_eq!(served_serial(port, &creds).await, first.serial);
    let mut open = connect(port, operator_tls(&creds, NODE))
        .await
        .expect("connect");
    let (calls, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = tokio_util_stop();
    let caller = {
        let (calls, failures, stop) = (calls.clone(), failures.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match open.get_capabilities(pb::GetCapabilitiesRequest {}).await {
                    Ok(_) => calls.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = enroll.enroll_once().await.expect("renewed");
    assert_ne!(second.serial, first.serial);
    // New connections get the new certificate, without a restart.
    assert_eq!(served_serial(port, &creds).await, second.serial);
    assert!(served(port, operator_tls(&creds, NODE)).await);

    // The operator's identity renews too: a renewed identity is served, on new connections.
    let renewing = OperatorCredentials::new(&ca, Duration::from_secs(1)).expect("creds");
    let before = renewing.current();
    assert_eq!(renewing.renew_if_due(&ca, HOUR).expect("renew"), Some(2));
    let renewed = renewing.current();
    assert_ne!(renewed.info.serial, before.info.serial);
    assert!(served(port, operator_tls(&renewed, NODE)).await);
    assert_eq!(served_serial(port, &renewed).await, second.serial);

    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    caller.await.expect("caller");
    let (calls, failures) = (
        calls.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    assert!(calls >= 5, "only {calls} calls went through");
    assert_eq!(
        failures, 0,
        "calls on the open connection failed during rotation"
    );
}

fn tokio_util_stop() -> Arc<std::sync::atomic::AtomicBool> {
    Arc::new(std::sync::atomic::AtomicBool::new(false))
}
