//! The egress policy of `http` disk sources on this node (`hvx_storage::egress`): what
//! it denies besides the built-in ranges, gathered at start-up.

use hvx_storage::egress::{DeniedNet, HttpPolicy};
use ipnet::IpNet;
use std::net::IpAddr;

/// What the policy is built from (flags and what the agent found at start-up).
#[derive(Clone, Debug, Default)]
pub struct PolicyInputs {
    /// `--pod-cidr`.
    pub pod_cidrs: Vec<IpNet>,
    /// `--service-cidr`.
    pub service_cidrs: Vec<IpNet>,
    /// `--http-deny-cidr` (`agent.httpSources.denyCIDRs`).
    pub extra_denied: Vec<IpNet>,
    /// `--http-allow-cidr` (`agent.httpSources.allowCIDRs`).
    pub allowed: Vec<IpNet>,
    /// This node's addresses (every interface of the host network namespace).
    pub node_addrs: Vec<IpAddr>,
    /// The API server's addresses (its Service and its endpoints).
    pub apiserver_addrs: Vec<IpAddr>,
    /// `--http-trusted-origin`: origins fetched without the egress checks.
    pub trusted_origins: Vec<String>,
}

/// The policy (pure).
pub fn build(inputs: &PolicyInputs) -> HttpPolicy {
    let mut denied = Vec::new();
    let mut add = |nets: &mut dyn Iterator<Item = IpNet>, what: &str| {
        for net in nets {
            denied.push(DeniedNet {
                net,
                what: what.to_string(),
            });
        }
    };
    add(&mut inputs.pod_cidrs.iter().copied(), "the pod CIDR");
    add(
        &mut inputs.service_cidrs.iter().copied(),
        "the service CIDR",
    );
    add(
        &mut inputs.node_addrs.iter().map(|ip| IpNet::from(*ip)),
        "this node's addresses",
    );
    add(
        &mut inputs.apiserver_addrs.iter().map(|ip| IpNet::from(*ip)),
        "the Kubernetes API server's addresses",
    );
    add(
        &mut inputs.extra_denied.iter().copied(),
        "agent.httpSources.denyCIDRs",
    );
    HttpPolicy {
        denied,
        allowed: inputs.allowed.clone(),
        trusted_origins: inputs.trusted_origins.clone(),
        ..HttpPolicy::default()
    }
}

/// Addresses in `ip -o addr show` output (pure).
pub fn parse_ip_addr(out: &str) -> Vec<IpAddr> {
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            let cidr = words.next()?;
            cidr.split('/').next()?.parse().ok()
        })
        .collect()
}

/// Every address of this (host) network namespace.
pub fn node_addresses() -> Vec<IpAddr> {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["-o", "addr", "show"]);
    match hvx_child::output(cmd) {
        Ok(o) => parse_ip_addr(&String::from_utf8_lossy(&o.stdout)),
        Err(e) => {
            tracing::warn!(error = %e, "listing this node's addresses for the http source policy");
            Vec::new()
        }
    }
}

/// The API server's addresses: the in-cluster Service address and, when readable,
/// the endpoints behind it (`default/kubernetes`). Best effort: a failure is logged
/// and the rest of the policy still applies.
pub async fn apiserver_addresses() -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = std::env::var("KUBERNETES_SERVICE_HOST")
        .ok()
        .and_then(|h| h.parse().ok())
        .into_iter()
        .collect();
    let endpoints = async {
        use k8s_openapi::api::core::v1::Endpoints;
        let client = kube::Client::try_default().await?;
        let api: kube::Api<Endpoints> = kube::Api::namespaced(client, "default");
        api.get("kubernetes").await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), endpoints).await {
        Ok(Ok(ep)) => {
            for subset in ep.subsets.unwrap_or_default() {
                for a in subset.addresses.unwrap_or_default() {
                    if let Ok(ip) = a.ip.parse() {
                        addrs.push(ip);
                    }
                }
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "reading the API server's endpoints"),
        Err(_) => tracing::warn!("reading the API server's endpoints timed out"),
    }
    addrs
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_addr_output() {
        let out = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                   2: eth0    inet 192.168.1.10/24 brd 192.168.1.255 scope global eth0\n\
                   2: eth0    inet6 fe80::1/64 scope link \\       valid_lft forever\n\
                   3: eth1    link/ether 00:11:22:33:44:55 brd ff:ff:ff:ff:ff:ff\n";
        let got: Vec<String> = parse_ip_addr(out).iter().map(|i| i.to_string()).collect();
        assert_eq!(got, ["127.0.0.1", "192.168.1.10", "fe80::1"]);
    }

    #[test]
    fn denies_node_apiserver_and_cluster_ranges_with_their_names() {
        let p = build(&PolicyInputs {
            pod_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
            extra_denied: vec!["203.0.113.0/24".parse().unwrap()],
            allowed: vec!["10.244.5.0/24".parse().unwrap()],
            node_addrs: vec!["192.168.1.10".parse().unwrap()],
            apiserver_addrs: vec!["192.168.1.2".parse().unwrap()],
            trusted_origins: vec![],
        });
        for (ip, what) in [
            ("10.244.1.1", "pod CIDR"),
            ("10.100.0.1", "service CIDR"),
            ("192.168.1.10", "this node"),
            ("192.168.1.2", "API server"),
            ("203.0.113.9", "denyCIDRs"),
        ] {
            let err = p.check(ip.parse().unwrap()).unwrap_err();
            assert!(err.contains(what), "{ip}: {err}");
        }
        assert_eq!(p.check("10.244.5.5".parse().unwrap()), Ok(()));
        assert_eq!(p.check("192.168.1.11".parse().unwrap()), Ok(()));
    }
}
