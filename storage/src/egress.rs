//! Where `http` disk sources may be fetched from. The agent fetches from the node's
//! network, so a URL naming 169.254.169.254, a localhost service, the API server or a
//! pod would hand its answer to a tenant as a disk. Each hop's host is resolved once,
//! checked here, and the connection goes to that checked address (no second lookup a
//! DNS answer could change in between); redirects are followed by hand and checked the
//! same way.

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// One denied range and what it is (named in refusals).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeniedNet {
    /// The range.
    pub net: IpNet,
    /// What it is: "the pod CIDR", "this node's address", ...
    pub what: String,
}

/// The egress policy of `http` disk sources.
#[derive(Clone, Debug)]
pub struct HttpPolicy {
    /// Ranges refused besides the built-in ones (loopback, link-local, unspecified,
    /// multicast, broadcast).
    pub denied: Vec<DeniedNet>,
    /// Exceptions: an address in one of these is allowed even if denied above or
    /// built-in (`agent.httpSources.allowCIDRs`).
    pub allowed: Vec<IpNet>,
    /// Origins (`scheme://host:port`, as the first URL names them) fetched without
    /// checks: the operator's own upload Service, which sits in the service CIDR.
    /// Only the first hop may use it; its answers are not followed as redirects.
    pub trusted_origins: Vec<String>,
    /// Redirects followed before giving up.
    pub max_redirects: usize,
}

impl Default for HttpPolicy {
    fn default() -> Self {
        Self {
            denied: Vec::new(),
            allowed: Vec::new(),
            trusted_origins: Vec::new(),
            max_redirects: 5,
        }
    }
}

/// The built-in class of `ip`, if it is one no disk may come from.
fn builtin_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some("a loopback address")
            } else if v4.is_link_local() {
                Some("a link-local address (cloud metadata lives there)")
            } else if v4.is_unspecified() {
                Some("the unspecified address")
            } else if v4.is_multicast() {
                Some("a multicast address")
            } else if v4.is_broadcast() {
                Some("the broadcast address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return builtin_class(IpAddr::V4(v4));
            }
            let seg0 = v6.segments()[0];
            if v6.is_loopback() {
                Some("a loopback address")
            } else if seg0 & 0xffc0 == 0xfe80 {
                Some("a link-local address")
            } else if v6.is_unspecified() {
                Some("the unspecified address")
            } else if v6.is_multicast() {
                Some("a multicast address")
            } else {
                None
            }
        }
    }
}

/// An IPv4-mapped IPv6 address as its IPv4 address (ranges are written in IPv4).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl HttpPolicy {
    /// Why `ip` may not be fetched from, or `Ok` (pure).
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        let ip = canonical(ip);
        if self.allowed.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        if let Some(class) = builtin_class(ip) {
            return Err(format!("{ip} is {class}"));
        }
        if let Some(d) = self.denied.iter().find(|d| d.net.contains(&ip)) {
            return Err(format!("{ip} is in {} ({})", d.what, d.net));
        }
        Ok(())
    }

    /// The address to connect to for `host` among its resolved `addrs`: the first
    /// allowed one; if none is, why (naming the host and the allow-list setting).
    pub fn pick(&self, host: &str, addrs: &[SocketAddr]) -> Result<SocketAddr, String> {
        let mut first_reason = None;
        for a in addrs {
            match self.check(a.ip()) {
                Ok(()) => return Ok(*a),
                Err(why) => {
                    first_reason.get_or_insert(why);
                }
            }
        }
        Err(match first_reason {
            Some(why) => format!(
                "refused: {host}: {why}; http disk sources may not reach the \
                 node, its cluster or metadata ranges (allow a range with the chart value \
                 agent.httpSources.allowCIDRs)"
            ),
            None => format!("refused: {host} resolves to no address"),
        })
    }

    /// Whether `url` (the first hop) is one of the trusted origins.
    pub fn trusted(&self, url: &reqwest::Url) -> bool {
        let origin = url.origin().ascii_serialization();
        self.trusted_origins
            .iter()
            .any(|t| t.trim_end_matches('/') == origin)
    }
}

/// A URL's host as DNS or literal text, and its port.
pub fn host_port(url: &reqwest::Url) -> Result<(String, u16), String> {
    // IPv6 literals come bracketed.
    let host = url
        .host_str()
        .ok_or_else(|| "the URL has no host".to_string())?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url
        .port_or_known_default()
        .ok_or_else(|| "the URL has no port".to_string())?;
    Ok((host, port))
}

/// Resolves `url`'s host once and checks it: the address to connect to.
pub async fn resolve_checked(
    policy: &HttpPolicy,
    url: &reqwest::Url,
) -> Result<SocketAddr, String> {
    let (host, port) = host_port(url)?;
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| format!("resolving {host}: {e}"))?
            .collect(),
    };
    policy.pick(&host, &addrs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn policy() -> HttpPolicy {
        HttpPolicy {
            denied: vec![
                DeniedNet {
                    net: "10.244.0.0/16".parse().unwrap(),
                    what: "the pod CIDR".into(),
                },
                DeniedNet {
                    net: "10.96.0.0/12".parse().unwrap(),
                    what: "the service CIDR".into(),
                },
                DeniedNet {
                    net: "192.168.1.10/32".parse().unwrap(),
                    what: "this node's address".into(),
                },
            ],
            allowed: vec!["10.244.7.0/24".parse().unwrap()],
            ..Default::default()
        }
    }

    #[test]
    fn refuses_builtin_and_cluster_ranges() {
        let p = policy();
        for (ip, why) in [
            ("127.0.0.1", "loopback"),
            ("127.9.9.9", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("10.244.3.4", "pod CIDR"),
            ("10.96.0.1", "service CIDR"),
            ("::ffff:10.96.0.1", "service CIDR"),
            ("192.168.1.10", "node's address"),
        ] {
            let err = p.check(ip.parse().unwrap()).expect_err(ip);
            assert!(err.contains(why), "{ip}: {err}");
        }
    }

    #[test]
    fn allows_public_and_listed_exceptions() {
        let p = policy();
        for ip in ["93.184.216.34", "192.168.1.11", "10.244.7.9", "2001:db8::1"] {
            assert_eq!(p.check(ip.parse().unwrap()), Ok(()), "{ip}");
        }
        let mut p = policy();
        p.allowed.push("127.0.0.0/8".parse().unwrap());
        assert_eq!(p.check("127.0.0.1".parse().unwrap()), Ok(()));
    }

    #[test]
    fn picks_the_first_allowed_address_and_names_the_setting() {
        let p = policy();
        let a: Vec<SocketAddr> = vec![
            "127.0.0.1:80".parse().unwrap(),
            "93.184.216.34:80".parse().unwrap(),
        ];
        assert_eq!(p.pick("h", &a), Ok(a[1]));
        let err = p.pick("meta", &a[..1]).unwrap_err();
        assert!(
            err.contains("refused: meta: 127.0.0.1 is a loopback"),
            "{err}"
        );
        assert!(err.contains("agent.httpSources.allowCIDRs"), "{err}");
        assert!(p.pick("none", &[]).unwrap_err().contains("no address"));
    }

    #[test]
    fn trusted_origins_match_exactly() {
        let mut p = policy();
        p.trusted_origins = vec!["http://hvx-upload.hvx-system.svc:8081".into()];
        let yes = reqwest::Url::parse("http://hvx-upload.hvx-system.svc:8081/v1alpha1/uploads/x")
            .unwrap();
        assert!(p.trusted(&yes));
        for no in [
            "http://hvx-upload.hvx-system.svc:8082/v1alpha1/uploads/x",
            "https://hvx-upload.hvx-system.svc:8081/x",
            "http://hvx-upload.hvx-system.svc.evil:8081/x",
            "http://user@hvx-upload.evil:8081/x",
        ] {
            assert!(!p.trusted(&reqwest::Url::parse(no).unwrap()), "{no}");
        }
    }
}
