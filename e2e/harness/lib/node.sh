# Worker nodes: one network namespace each, wired to a root-namespace bridge, with
# its own containerd, kubelet and kube-proxy.
# shellcheck shell=bash

setup_network() {
  log "network: bridge ${BRIDGE} ${BRIDGE_IP}/24 and ${NODE_COUNT} node namespaces"
  if ! ip link show "${BRIDGE}" >/dev/null 2>&1; then
    ip link add "${BRIDGE}" type bridge
    ip addr add "${BRIDGE_IP}/24" dev "${BRIDGE}"
  fi
  ip link set "${BRIDGE}" up
  local n m ns
  for n in $(seq 1 "${NODE_COUNT}"); do
    ns="$(node_netns "${n}")"
    ip netns add "${ns}"
    ip link add "$(node_veth "${n}")" type veth peer name eth0 netns "${ns}"
    ip link set "$(node_veth "${n}")" master "${BRIDGE}" up
    ip -n "${ns}" link set lo up
    ip -n "${ns}" addr add "$(node_ip "${n}")/24" dev eth0
    ip -n "${ns}" link set eth0 up
    # Only the bridge address and other nodes are reachable: root-namespace
    # forwarding stays as it is, so nothing leaves the machine.
    ip -n "${ns}" route add default via "${BRIDGE_IP}"
    ip netns exec "${ns}" sysctl -qw net.ipv4.ip_forward=1
    ip netns exec "${ns}" sysctl -qw net.ipv4.conf.all.route_localnet=1
    # The apiserver (webhooks) reaches pods through the node that hosts them.
    ip route replace "$(node_pod_cidr "${n}")" via "$(node_ip "${n}")" dev "${BRIDGE}"
  done
  for n in $(seq 1 "${NODE_COUNT}"); do
    for m in $(seq 1 "${NODE_COUNT}"); do
      [[ "${n}" == "${m}" ]] && continue
      ip -n "$(node_netns "${n}")" route add "$(node_pod_cidr "${m}")" via "$(node_ip "${m}")"
    done
  done
}

write_node_configs() {
  local n="$1" dir name
  dir="$(node_dir "${n}")"
  name="$(node_name "${n}")"
  mkdir -p "${dir}"/{containerd/root,containerd/state,runc,cni/net.d,cni/ipam,kubelet,pod-logs,kube-proxy}
  mkdir -p "$(node_kubelet_root "${n}")"
  cat > "${dir}/containerd/config.toml" <<TOML
version = 2
root = "${dir}/containerd/root"
state = "${dir}/containerd/state"
oom_score = 0
[grpc]
  address = "${dir}/containerd.sock"
[ttrpc]
  address = ""
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "${dir}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "${PAUSE_IMAGE}"
  # No CAP_SYS_RESOURCE here: never ask runc for an oom_score_adj below ours.
  restrict_oom_score_adj = true
  # Pod network namespaces stay below this node's state dir (cleanup finds them).
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
        Root = "${dir}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "${dir}/cni/net.d"
    max_conf_num = 1
TOML
  cat > "${dir}/cni/net.d/10-hvx-bridge.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "hvx-pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "${dir}/cni/ipam",
        "ranges": [[{"subnet": "$(node_pod_cidr "${n}")"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
  # Pods resolve through the cluster DNS only; an empty host resolv.conf keeps
  # the host's resolver and search domains out of them.
  : > "${dir}/resolv.conf"
  cat > "${dir}/kubelet/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $(node_ip "${n}")
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: ${PKI_DIR}/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://${dir}/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /$(node_cgroup "${n}")
cgroupsPerQOS: true
# This machine has cgroup v1 (hybrid); 1.34 still supports it when asked.
failCgroupV1: false
failSwapOn: false
# Without CAP_SYS_RESOURCE the kubelet can neither lower its oom_score_adj nor
# raise RLIMIT_NOFILE past the hard limit.
oomScoreAdj: 0
maxOpenFiles: $(ulimit -Hn)
protectKernelDefaults: false
podCIDR: $(node_pod_cidr "${n}")
podLogsDir: ${dir}/pod-logs
resolvConf: ${dir}/resolv.conf
clusterDNS: [${DNS_IP}]
clusterDomain: ${CLUSTER_DOMAIN}
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
maxPods: 50
registerNode: true
syncFrequency: 10s
nodeStatusReportFrequency: 10s
fileCheckFrequency: 10s
YAML
  cat > "${dir}/kube-proxy/config.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: ${PKI_DIR}/kube-proxy.kubeconfig
hostnameOverride: ${name}
bindAddress: $(node_ip "${n}")
clusterCIDR: ${CLUSTER_CIDR}
mode: iptables
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack:
  # The conntrack table is the host's: do not resize it.
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
YAML
}

start_node() {
  local n="$1" dir name ns cg
  dir="$(node_dir "${n}")"; name="$(node_name "${n}")"; ns="$(node_netns "${n}")"; cg="$(node_cgroup "${n}")"
  write_node_configs "${n}"
  log "node ${name}: containerd"
  start_daemon "containerd-${n}" "${cg}" "${ns}" containerd --config "${dir}/containerd/config.toml"
  wait_for "containerd of ${name}" 60 ctr --address "${dir}/containerd.sock" version \
    || die "containerd of ${name} did not start (see ${CLUSTER_DIR}/logs/containerd-${n}.log)"
  import_node_images "${n}"
  log "node ${name}: kubelet and kube-proxy"
  start_daemon "kubelet-${n}" "${cg}" "${ns}" "${BIN_DIR}/kubelet" \
    --config "${dir}/kubelet/config.yaml" \
    --kubeconfig "${PKI_DIR}/kubelet-${n}.kubeconfig" \
    --root-dir "$(node_kubelet_root "${n}")" \
    --hostname-override "${name}" \
    --node-ip "$(node_ip "${n}")" \
    --node-labels "hvx.dev/local-node=${n}" \
    --v 1
  start_daemon "kube-proxy-${n}" "${cg}" "${ns}" "${BIN_DIR}/kube-proxy" \
    --config "${dir}/kube-proxy/config.yaml" --v 1
}

# Images the nodes need without a registry: the pause sandbox and the test image.
import_node_images() {
  local n="$1" dir tar
  dir="$(node_dir "${n}")"
  for tar in "${HVX_CACHE}/images/pause.tar" "${HVX_CACHE}/images/e2e-busybox.tar" "${HVX_CACHE}"/images/extra/*.tar; do
    [[ -f "${tar}" ]] || continue
    import_image "${dir}/containerd.sock" "${tar}" || die "importing ${tar} into $(node_name "${n}") failed"
  done
}
