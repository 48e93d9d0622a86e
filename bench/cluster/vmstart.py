#!/usr/bin/env python3
"""VM start on the local cluster with hvx installed: apply -> VM Running (QEMU
started: launcher pod ready) and apply -> guest reachable (DHCP lease in status and
the guest answers ping from its network's gateway on its node), p50/p95 over N VMs applied in batches.
Baseline in the same run: plain QEMU started by hand on this host with the same guest,
memory and accelerator (process start -> guest's `HVX-GUEST ready` on serial).
Prints `BENCH {json}` lines; the published anchor is KubeVirt's creation -> Running.
"""
import json, os, subprocess, sys, tempfile, time

KUBECTL = os.environ["KUBECTL"]
NS = "hvx-bench-start"
N = int(os.environ.get("HVX_BENCH_VMS", "20"))
BATCH = int(os.environ.get("HVX_BENCH_BATCH", "5"))
GUEST = os.environ["GUEST"]
URL = "http://hvx-samples.hvx-samples.svc:8080/sample-guest-stream.vmdk"


def k(*args, input=None, check=True):
    r = subprocess.run([KUBECTL, *args], input=input, capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.exit(f"kubectl {' '.join(args)}: {r.stderr}")
    return r.stdout


def apply(objs):
    k("-n", NS, "apply", "--server-side", "--field-manager=hvx-bench", "-f", "-",
      input="\n---\n".join(json.dumps(o) for o in objs))


def app(i):
    return {"apiVersion": "hvx.dev/v1alpha1", "kind": "VmApplication",
            "metadata": {"name": f"vm{i:02d}"},
            "spec": {"vms": [{
                "name": "vm", "cpu": {"sockets": 1, "coresPerSocket": 1}, "memoryMib": 256,
                "controllers": [{"type": "pvscsi", "bus": 0, "pciSlot": 5}],
                "disks": [{"name": "root", "overlayDisk": {"name": "root"}, "controller": "pvscsi",
                           "bus": 0, "unit": 0, "bootOrder": 1}],
                "nics": [{"name": "ethernet0", "network": {"name": "net"}, "model": "vmxnet3",
                          "macAddress": f"00:50:56:b0:00:{i:02x}", "pciSlot": 16}]}]}}


def gateway_netns(node, vni):
    """The network namespace of network `vni`'s gateway on `node`: since each
    VirtualNetwork has its own gateway namespace per node (so subnets may overlap),
    the node's own namespace has no route to guests. Found through the dnsmasq the
    agent runs there (its config path names node and VNI)."""
    conf = f"/nodes/{node}/overlay/{vni}/dnsmasq.conf"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "dnsmasq":
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if conf.encode() in f.read():
                    return f"/proc/{pid}/ns/net"
        except OSError:
            continue
    return None


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, round((len(v) - 1) * p))]


def raw_qemu_ready():
    """Plain QEMU, same guest/memory/accelerator: start -> `HVX-GUEST ready`."""
    with tempfile.TemporaryDirectory() as d:
        ov = os.path.join(d, "root.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "vmdk", "-b",
                        os.path.join(GUEST, "disk-stream.vmdk"), ov], check=True)
        log = os.path.join(d, "serial.log")
        t0 = time.monotonic()
        p = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg,thread=multi,tb-size=64",
                              "-machine", "pc", "-m", "256", "-nodefaults", "-display", "none",
                              "-device", "pvscsi,id=scsi0", "-drive", f"file={ov},format=qcow2,if=none,id=d0",
                              "-device", "scsi-hd,drive=d0,bus=scsi0.0", "-serial", f"file:{log}",
                              "-netdev", "user,id=n0", "-device", "vmxnet3,netdev=n0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while time.monotonic() - t0 < 300:
                if os.path.exists(log) and "HVX-GUEST ready" in open(log, errors="replace").read():
                    return time.monotonic() - t0
                time.sleep(0.1)
            sys.exit("plain QEMU guest not ready in 300 s")
        finally:
            p.kill()
            p.wait()


def main():
    k("delete", "namespace", NS, "--ignore-not-found", "--wait=true")
    k("create", "namespace", NS)
    apply([{"apiVersion": "hvx.dev/v1alpha1", "kind": "VirtualNetwork", "metadata": {"name": "net"},
            "spec": {"subnets": [{"name": "main", "cidr": "10.88.0.0/24", "gateway": "10.88.0.1",
                                  "dhcp": {"rangeStart": "10.88.0.10", "rangeEnd": "10.88.0.250"}}]}},
           {"apiVersion": "hvx.dev/v1alpha1", "kind": "OverlayDisk", "metadata": {"name": "root"},
            "spec": {"source": {"http": {"url": URL}}, "format": "Vmdk"}}])
    vni, vni_deadline = None, time.monotonic() + 120
    while vni is None:
        if time.monotonic() > vni_deadline:
            sys.exit("VirtualNetwork net has no VNI in its status after 120 s")
        out = k("-n", NS, "get", "virtualnetwork", "net", "-o", "json", check=False)
        try:
            vni = json.loads(out)["status"]["vni"]
        except Exception:
            time.sleep(0.2)
    running, reachable = [], []
    for b in range(0, N, BATCH):
        ids = list(range(b, min(N, b + BATCH)))
        t0 = {}
        for i in ids:
            apply([app(i)])
            t0[i] = time.monotonic()
        done_run, done_reach = {}, {}
        deadline = time.monotonic() + 900
        while len(done_reach) < len(ids) and time.monotonic() < deadline:
            for i in ids:
                if i in done_reach:
                    continue
                out = k("-n", NS, "get", "vmapp", f"vm{i:02d}", "-o", "json", check=False)
                try:
                    vm = json.loads(out)["status"]["vms"][0]
                except Exception:
                    continue
                now = time.monotonic()
                if vm.get("phase") == "Running" and i not in done_run:
                    done_run[i] = now - t0[i]
                ip = (vm.get("interfaces") or [{}])[0].get("ipAddress")
                node = vm.get("node")
                netns = gateway_netns(node, vni) if i in done_run and ip and node else None
                if netns:
                    r = subprocess.run(["nsenter", f"--net={netns}", "ping", "-c1", "-W1", ip],
                                       capture_output=True)
                    if r.returncode == 0:
                        done_reach[i] = time.monotonic() - t0[i]
            time.sleep(0.5)
        if len(done_reach) < len(ids):
            sys.exit(f"batch {b}: only {len(done_reach)}/{len(ids)} VMs reachable in 900 s")
        running += done_run.values()
        reachable += done_reach.values()
        print(f"batch {b // BATCH + 1}: running {sorted(round(x, 1) for x in done_run.values())} "
              f"reachable {sorted(round(x, 1) for x in done_reach.values())}", file=sys.stderr)
        for i in ids:
            k("-n", NS, "delete", "vmapp", f"vm{i:02d}", "--wait=false", check=False)
        for i in ids:
            k("-n", NS, "wait", "--for=delete", f"vmapp/vm{i:02d}", "--timeout=300s", check=False)
    k("delete", "namespace", NS, "--wait=true", "--timeout=300s", check=False)
    base = sorted(raw_qemu_ready() for _ in range(3))[1]
    for name, values in [("apply -> Running (QEMU started)", running),
                         ("apply -> guest reachable", reachable)]:
        for p, anchor in [(0.5, "KubeVirt creation->Running p50 22.6 s"),
                          (0.95, "KubeVirt creation->Running p95 29.7 s")]:
            v = pct(values, p)
            print("BENCH " + json.dumps({
                "group": "vm start (cluster)", "metric": f"{name} p{int(p * 100)} over {N} VMs, {BATCH} at a time",
                "unit": "s", "value": round(v, 2), "baseline": "plain QEMU start -> guest ready (median of 3)",
                "baseline_value": round(base, 2), "ratio": round(v / base, 2), "anchor": anchor}))


main()
