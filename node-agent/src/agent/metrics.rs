//! Prometheus text on `/metrics` and liveness on `/healthz`, over a deliberately tiny
//! HTTP/1.1 server: two fixed GET paths do not justify a web framework.
//!
//! The agent runs on the host network, so its metrics port is reachable by every pod
//! of the cluster without authentication: it serves node totals only (how many VMs,
//! their summed counters), never a VM's id or name. Per-VM series are served on a
//! second listener bound to loopback (`--vm-metrics-listen`, 127.0.0.1:9445), for
//! collectors running on the node itself.

use super::{Agent, vms};
use std::fmt::Write as _;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One per-VM metric: name, Prometheus type, value.
type Series = (
    &'static str,
    &'static str,
    fn(&hvx_proto::v1::VmMetrics) -> f64,
);

/// How much a listener tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// Node totals: no VM ids or names (the unauthenticated port).
    NodeTotals,
    /// One series per VM, labelled with its id (loopback only).
    PerVm,
}

/// The metrics text now.
pub async fn render(agent: &Agent, detail: Detail) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE hvx_agent_up gauge\nhvx_agent_up 1");
    let _ = writeln!(out, "# TYPE hvx_agent_rpc_total counter");
    let counts = agent
        .rpc_counts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort();
    for ((method, code), n) in counts {
        let _ = writeln!(
            out,
            "hvx_agent_rpc_total{{method=\"{}\",code=\"{}\"}} {n}",
            esc(&method),
            esc(&code)
        );
    }
    let report = agent
        .prereq
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(report) = report {
        write_prerequisites(&mut out, &report);
    }
    if let Ok(space) = agent.store.space().await {
        let _ = writeln!(
            out,
            "# TYPE hvx_store_used_bytes gauge\nhvx_store_used_bytes {}",
            space.bases_bytes + space.disks_bytes
        );
        let _ = writeln!(
            out,
            "# TYPE hvx_store_free_bytes gauge\nhvx_store_free_bytes {}",
            space.filesystem_available
        );
    }
    let found = vms::list(agent);
    let mut rows: Vec<(String, hvx_proto::v1::VmMetrics)> = Vec::new();
    for vm in &found {
        if let Ok(m) = vms::metrics(agent, &vm.id.vm_id).await {
            rows.push((vm.id.vm_id.clone(), m));
        }
    }
    let series: [Series; 11] = [
        ("hvx_vm_cpu_seconds_total", "counter", |m| {
            m.cpu_time_ns as f64 / 1e9
        }),
        ("hvx_vm_memory_rss_bytes", "gauge", |m| {
            m.memory_rss_bytes as f64
        }),
        ("hvx_vm_disk_read_ops_total", "counter", |m| {
            m.disk_read_ops as f64
        }),
        ("hvx_vm_disk_write_ops_total", "counter", |m| {
            m.disk_write_ops as f64
        }),
        ("hvx_vm_disk_read_bytes_total", "counter", |m| {
            m.disk_read_bytes as f64
        }),
        ("hvx_vm_disk_write_bytes_total", "counter", |m| {
            m.disk_write_bytes as f64
        }),
        ("hvx_vm_net_rx_packets_total", "counter", |m| {
            m.net_rx_packets as f64
        }),
        ("hvx_vm_net_tx_packets_total", "counter", |m| {
            m.net_tx_packets as f64
        }),
        ("hvx_vm_net_rx_bytes_total", "counter", |m| {
            m.net_rx_bytes as f64
        }),
        ("hvx_vm_net_tx_bytes_total", "counter", |m| {
            m.net_tx_bytes as f64
        }),
        ("hvx_vm_up", "gauge", |_| 1.0),
    ];
    match detail {
        Detail::PerVm => {
            for (name, kind, f) in series {
                let _ = writeln!(out, "# TYPE {name} {kind}");
                for (vm, m) in &rows {
                    let _ = writeln!(out, "{name}{{vm=\"{}\"}} {}", esc(vm), f(m));
                }
            }
        }
        Detail::NodeTotals => write_totals(&mut out, &series, &rows),
    }
    out
}

/// Node totals of the per-VM series: `hvx_vm_x` becomes `hvx_node_vms_x`, summed;
/// `hvx_vm_up` becomes the VM count `hvx_node_vms`.
fn write_totals(out: &mut String, series: &[Series], rows: &[(String, hvx_proto::v1::VmMetrics)]) {
    let _ = writeln!(
        out,
        "# TYPE hvx_node_vms gauge\nhvx_node_vms {}",
        rows.len()
    );
    for (name, kind, f) in series {
        let Some(rest) = name.strip_prefix("hvx_vm_") else {
            continue;
        };
        if rest == "up" {
            continue;
        }
        let total: f64 = rows.iter().map(|(_, m)| f(m)).sum();
        let _ = writeln!(
            out,
            "# TYPE hvx_node_vms_{rest} {kind}\nhvx_node_vms_{rest} {total}"
        );
    }
}

/// The prerequisite report: 1 per check that did not fail, and the failed count.
fn write_prerequisites(out: &mut String, report: &hvx_api::prereq::Report) {
    use hvx_api::prereq::Outcome;
    let _ = writeln!(out, "# TYPE hvx_agent_prerequisite_ok gauge");
    for c in &report.checks {
        let _ = writeln!(
            out,
            "hvx_agent_prerequisite_ok{{check=\"{}\"}} {}",
            esc(&c.name),
            u8::from(c.result != Outcome::Fail)
        );
    }
    let _ = writeln!(
        out,
        "# TYPE hvx_agent_prerequisites_failed gauge\nhvx_agent_prerequisites_failed {}",
        report.failed().count()
    );
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, agent: Arc<Agent>, detail: Detail) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", render(&agent, detail).await),
                "/healthz" => ("200 OK", "ok\n".to_string()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prerequisites_are_one_series_per_check() {
        use hvx_api::prereq::{Check, Outcome, Report};
        let c = |name: &str, result| Check {
            name: name.into(),
            result,
            message: String::new(),
        };
        let mut out = String::new();
        write_prerequisites(
            &mut out,
            &Report {
                checks: vec![
                    c("tun", Outcome::Ok),
                    c("kvm", Outcome::Warn),
                    c("nftables", Outcome::Fail),
                ],
            },
        );
        assert!(
            out.contains("hvx_agent_prerequisite_ok{check=\"kvm\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("hvx_agent_prerequisite_ok{check=\"nftables\"} 0\n"),
            "{out}"
        );
        assert!(out.contains("hvx_agent_prerequisites_failed 1\n"), "{out}");
    }

    #[test]
    fn node_totals_name_no_vm() {
        let series: [Series; 2] = [
            ("hvx_vm_cpu_seconds_total", "counter", |m| {
                m.cpu_time_ns as f64 / 1e9
            }),
            ("hvx_vm_up", "gauge", |_| 1.0),
        ];
        let m = |ns| hvx_proto::v1::VmMetrics {
            cpu_time_ns: ns,
            ..Default::default()
        };
        let rows = vec![
            ("u-1/web".to_string(), m(1_000_000_000)),
            ("u-2/db".to_string(), m(2_000_000_000)),
        ];
        let mut out = String::new();
        write_totals(&mut out, &series, &rows);
        assert!(out.contains("hvx_node_vms 2\n"), "{out}");
        assert!(out.contains("hvx_node_vms_cpu_seconds_total 3\n"), "{out}");
        assert!(
            !out.contains("u-1") && !out.contains("u-2") && !out.contains("vm="),
            "{out}"
        );
    }
}
