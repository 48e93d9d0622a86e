//! `make bench` part for the overlay (run by bench/overlay/run.sh, as root):
//! throughput and latency between two VM endpoints across the overlay versus the
//! same two nodes over the plain veth underlay, and FDB convergence after MAC moves.
//! Prints one `BENCH {json}` line per figure. All traffic stays inside namespaces
//! this program creates (private 192.168.77.0/24 underlay, 10.77.0.0/24 overlay).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hvx_overlay::lab::{Lab, wait_until};
use hvx_overlay::*;

const SECONDS: &str = "5";

fn spec_for(lab: &Lab, ips: &BTreeMap<String, Ipv4Addr>, node: usize) -> NetworkSpec {
    NetworkSpec {
        name: "bench".into(),
        vni: 200,
        local_vtep: lab.nodes[node].vtep,
        underlay_mtu: lab.underlay_mtu,
        remote_vteps: lab
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != node)
            .map(|(_, n)| n.vtep)
            .collect(),
        subnets: vec![SubnetSpec {
            cidr: Ipv4Net {
                addr: Ipv4Addr::new(10, 77, 0, 0),
                prefix: 24,
            },
            gateway: Ipv4Addr::new(10, 77, 0, 1),
            dhcp: None,
            reservations: vec![],
        }],
        members: lab
            .vms
            .iter()
            .map(|vm| Member {
                vm: vm.name.clone(),
                mac: vm.mac,
                ip: ips.get(&vm.name).copied(),
                location: if vm.node == node {
                    Location::Local {
                        port: vm.port.clone(),
                    }
                } else {
                    Location::Remote {
                        vtep: lab.nodes[vm.node].vtep,
                    }
                },
            })
            .collect(),
        dns: DnsSpec::default(),
        firewall: FirewallSpec::default(),
        egress_nat: false,
        routed_peers: vec![],
        exposed: vec![],
        egress_denied: vec![],
        egress_allowed: vec![],
        external: None,
        gateway: true,
        broadcast_limit_pps: 0,
    }
}

/// Applies on all nodes in parallel; returns the wall time of the whole apply and
/// the latest moment (from the start) at which a node's FDB was reprogrammed.
fn apply_all(lab: &Lab, ips: &BTreeMap<String, Ipv4Addr>) -> anyhow::Result<(Duration, Duration)> {
    let specs: Vec<NetworkSpec> = (0..lab.nodes.len())
        .map(|i| spec_for(lab, ips, i))
        .collect();
    let started = Instant::now();
    let fdb = std::thread::scope(|s| -> anyhow::Result<Duration> {
        let handles: Vec<_> = lab
            .nodes
            .iter()
            .zip(&specs)
            .map(|(n, sp)| s.spawn(move || n.switch.apply(sp)))
            .collect();
        let mut latest = Duration::ZERO;
        for h in handles {
            let report = h
                .join()
                .map_err(|_| anyhow::anyhow!("apply thread panicked"))??;
            latest = latest.max(report.fdb_programmed_after.unwrap_or_default());
        }
        Ok(latest)
    })?;
    Ok((started.elapsed(), fdb))
}

fn iperf(lab: &Lab, server_ns: &str, client_ns: &str, server_ip: &str) -> anyhow::Result<f64> {
    let mut server = lab.spawn(server_ns, &["iperf3", "-s", "-1", "-B", server_ip])?;
    let ok = wait_until(Duration::from_secs(10), || {
        lab.exec(server_ns, &["ss", "-ltn"])
            .is_ok_and(|o| o.contains(":5201 "))
    });
    if !ok {
        let _ = server.kill();
        bail!("iperf3 server did not start");
    }
    let out = lab.exec(client_ns, &["iperf3", "-J", "-t", SECONDS, "-c", server_ip]);
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_str(&out?)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without sum_received")?;
    Ok(bps / 1e6)
}

/// Average RTT in microseconds over 100 pings at 10 ms intervals.
fn rtt_us(lab: &Lab, ns: &str, ip: &str) -> anyhow::Result<f64> {
    let out = lab.exec(ns, &["ping", "-q", "-c", "100", "-i", "0.01", ip])?;
    // "rtt min/avg/max/mdev = 0.031/0.045/0.120/0.010 ms"
    let stats = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .context("no ping summary")?;
    let avg: f64 = stats
        .split('=')
        .nth(1)
        .and_then(|s| s.trim().split('/').nth(1))
        .context("bad ping summary")?
        .parse()?;
    Ok(avg * 1000.0)
}

fn bench_line(metric: &str, unit: &str, value: f64, baseline: &str, baseline_value: f64) {
    let ratio = if baseline_value != 0.0 {
        value / baseline_value
    } else {
        0.0
    };
    let line = serde_json::json!({
        "group": "overlay", "metric": metric, "unit": unit,
        "value": (value * 100.0).round() / 100.0,
        "baseline": baseline, "baseline_value": (baseline_value * 100.0).round() / 100.0,
        "ratio": (ratio * 1000.0).round() / 1000.0,
    });
    println!("BENCH {line}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> anyhow::Result<()> {
    let mut lab = Lab::new(3, 1600)?;
    let mut ips = BTreeMap::new();
    for (i, (name, node)) in [("a", 0usize), ("b", 1usize)].into_iter().enumerate() {
        let vm = lab.add_vm(name, node, format!("00:50:56:00:05:0{}", i + 1).parse()?)?;
        let ip = Ipv4Addr::new(10, 77, 0, 11 + i as u8);
        lab.exec(
            &vm.ns,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        ips.insert(name.to_string(), ip);
    }
    apply_all(&lab, &ips)?;
    let (a_ns, b_ns) = (lab.vm("a").ns.clone(), lab.vm("b").ns.clone());
    let (n1, n2) = (lab.nodes[0].ns.clone(), lab.nodes[1].ns.clone());
    if !wait_until(Duration::from_secs(5), || {
        lab.exec(&a_ns, &["ping", "-c1", "-W1", "10.77.0.12"])
            .is_ok()
    }) {
        bail!("overlay endpoints cannot reach each other");
    }

    let under_tp = iperf(&lab, &n2, &n1, "192.168.77.2")?;
    let over_tp = iperf(&lab, &b_ns, &a_ns, "10.77.0.12")?;
    bench_line(
        "throughput_tcp",
        "Mbit/s",
        over_tp,
        "plain veth underlay",
        under_tp,
    );
    let under_rtt = rtt_us(&lab, &n1, "192.168.77.2")?;
    let over_rtt = rtt_us(&lab, &a_ns, "10.77.0.12")?;
    bench_line(
        "latency_rtt_avg",
        "us",
        over_rtt,
        "plain veth underlay",
        under_rtt,
    );

    // MAC moves: b hops between node 2 and node 3; every node is reprogrammed in
    // parallel, then we wait for a to reach b again.
    let (mut reprogram, mut applied, mut dataplane) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..6 {
        let to = if round % 2 == 0 { 2 } else { 1 };
        lab.move_vm("b", to)?;
        let started = Instant::now();
        let (took, fdb) = apply_all(&lab, &ips)?;
        let ok = wait_until(Duration::from_secs(5), || {
            lab.exec(&a_ns, &["ping", "-c1", "-W1", "10.77.0.12"])
                .is_ok()
        });
        if !ok {
            bail!("b unreachable after move {round}");
        }
        reprogram.push(fdb.as_secs_f64() * 1000.0);
        applied.push(took.as_secs_f64() * 1000.0);
        dataplane.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    bench_line(
        "fdb_reprogram_3_nodes_median",
        "ms",
        median(reprogram),
        "issue target",
        100.0,
    );
    bench_line(
        "full_apply_3_nodes_median",
        "ms",
        median(applied),
        "issue target",
        100.0,
    );
    bench_line(
        "mac_move_to_first_reply_median",
        "ms",
        median(dataplane),
        "issue target",
        100.0,
    );
    Ok(())
}
