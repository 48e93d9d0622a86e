//! A real QEMU guest (the shared VMware-like test guest, vmxnet3 NIC, TCG) on the
//! overlay: its tap sits on node 1's bridge, it gets its reserved address from
//! DHCP, and an endpoint on node 3 reaches it by ping and TCP across the tunnel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use hvx_overlay::lab::{Lab, wait_until};
use hvx_overlay::port::{PodNic, attach_pod_nic, detach_pod_nic};

/// `HVX_GUEST_DISK`, or the disk `hack/build-guest.sh` builds (warm runs are instant).
fn guest_disk() -> PathBuf {
    if let Ok(p) = std::env::var("HVX_GUEST_DISK") {
        return PathBuf::from(p);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../hack/build-guest.sh");
    assert!(
        script.exists(),
        "the shared test guest builder {} is missing (make guest-image)",
        script.display()
    );
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run build-guest.sh");
    assert!(out.status.success(), "build-guest.sh failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .expect("build-guest.sh printed no directory")
        .trim();
    PathBuf::from(dir).join("disk.raw")
}

/// Kills QEMU when the test ends, pass or fail.
struct Qemu(Child);
impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "privileged: make test-integration"]
fn qemu_guest_on_the_overlay() {
    if !root_or_skip("qemu_guest_on_the_overlay") {
        return;
    }
    let disk = guest_disk();
    assert!(disk.exists(), "guest disk {} missing", disk.display());

    let mut lab = Lab::new(3, 1600).unwrap();
    let mut net = Net::new();
    net.subnet.dhcp = Some(hvx_overlay::DhcpRange {
        start: "10.77.0.100".parse().unwrap(),
        end: "10.77.0.110".parse().unwrap(),
        lease_secs: 600,
    });
    lab.add_vm("peer", 2, mac("00:50:56:00:04:02")).unwrap();
    net.ips.insert("peer".into(), "10.77.0.12".parse().unwrap());
    set_ip(&lab, "peer", "10.77.0.12".parse().unwrap());

    // The guest's NIC as in production: a tap inside the VM's pod, bridged in the
    // pod to a veth whose other end is the switch port on node 1.
    let guest_mac = mac("00:50:56:00:04:01");
    let pod_ns = lab.add_namespace("pod").unwrap();
    let nic = PodNic::new("default/guest", 0, 1500);
    let node_host = lab.nodes[0].switch.host.clone();
    attach_pod_nic(&node_host, &pod_ns, &nic).unwrap();
    attach_pod_nic(&node_host, &pod_ns, &nic).unwrap(); // idempotent
    lab.vms.push(hvx_overlay::lab::LabVm {
        name: "guest".into(),
        ns: pod_ns.clone(),
        mac: guest_mac,
        port: nic.host_if.clone(),
        node: 0,
    });
    net.ips
        .insert("guest".into(), "10.77.0.60".parse().unwrap());
    net.apply_all(&lab);

    let drive = format!("file={},format=raw,if=ide,snapshot=on", disk.display());
    let netdev = format!("tap,id=n0,ifname={},script=no,downscript=no", nic.tap);
    let device = format!("vmxnet3,netdev=n0,mac={guest_mac}");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &pod_ns, "qemu-system-x86_64"])
        .args([
            "-accel",
            "tcg,thread=multi",
            "-m",
            "512",
            "-display",
            "none",
        ])
        .args(["-nodefaults", "-no-user-config", "-serial", "stdio"])
        .args(["-drive", &drive, "-netdev", &netdev, "-device", &device])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu");
    let stdout = child.stdout.take().unwrap();
    let _qemu = Qemu(child);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let started = Instant::now();
    let mut got_ip = None;
    let mut ready = false;
    while !(ready && got_ip.is_some()) {
        let left = Duration::from_secs(300).saturating_sub(started.elapsed());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("guest not ready after {:?}", started.elapsed()));
        if let Some(rest) = line.find("HVX-GUEST ").map(|i| &line[i..]) {
            eprintln!("serial: {rest}");
            if rest.starts_with("HVX-GUEST ip name=eth0 ") {
                got_ip = Some(rest.to_string());
            }
            ready |= rest.starts_with("HVX-GUEST ready");
        }
    }
    let ip_line = got_ip.unwrap();
    assert!(
        ip_line.contains("addr=10.77.0.60/"),
        "guest did not get its reserved address: {ip_line}"
    );
    eprintln!(
        "guest ready with its reserved address after {:?}",
        started.elapsed()
    );

    // From an endpoint on node 3: ICMP and the guest's TCP echo service (port 7).
    assert!(
        wait_until(Duration::from_secs(30), || ping(
            &lab,
            "peer",
            "10.77.0.60".parse().unwrap()
        )),
        "guest does not answer ping across the overlay"
    );
    let peer_ns = lab.vm("peer").ns.clone();
    let echo = lab
        .exec(
            &peer_ns,
            &[
                "sh",
                "-c",
                "echo hvx-guest-echo | socat -T 10 - TCP:10.77.0.60:7,connect-timeout=10",
            ],
        )
        .unwrap();
    assert!(
        echo.contains("hvx-guest-echo"),
        "TCP echo across the overlay: {echo:?}"
    );

    // Detach leaves nothing in the node or the pod.
    drop(_qemu);
    detach_pod_nic(&node_host, &pod_ns, &nic).unwrap();
    let node_links = lab.exec(&lab.nodes[0].ns, &["ip", "-o", "link"]).unwrap();
    let pod_links = lab.exec(&pod_ns, &["ip", "-o", "link"]).unwrap();
    assert!(
        !node_links.contains(&nic.host_if) && !pod_links.contains("hvk0"),
        "{node_links}\n{pod_links}"
    );
}
