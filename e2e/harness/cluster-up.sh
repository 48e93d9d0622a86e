#!/usr/bin/env bash
# Brings up the local test cluster: etcd + control plane (real TLS, RBAC,
# service-account keys) in the root namespace, and ${HVX_NODES:-3} worker nodes,
# each a network namespace with its own containerd, kubelet and kube-proxy.
# Writes _out/kubeconfig. Idempotent: when the cluster is already up and healthy
# it only checks it; a broken cluster is torn down and re-created.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
source "${HARNESS_DIR}/lib/pki.sh"
source "${HARNESS_DIR}/lib/controlplane.sh"
source "${HARNESS_DIR}/lib/node.sh"
source "${HARNESS_DIR}/lib/dns.sh"

[[ "$(id -u)" == 0 ]] || die "cluster-up needs root (network namespaces, cgroups, mounts)"

ready_node_count() {
  kubectl_admin get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null \
    | grep -c '^True$' || true
}

# Every node namespace still has its routes to the other nodes' pods.
network_intact() {
  local n m
  for n in $(seq 1 "${NODE_COUNT}"); do
    for m in $(seq 1 "${NODE_COUNT}"); do
      [[ "${n}" == "${m}" ]] && continue
      ip -n "$(node_netns "${n}")" route show "$(node_pod_cidr "${m}")" 2>/dev/null | grep -q via || return 1
    done
  done
}

cluster_healthy() {
  local d n
  for d in etcd kube-apiserver kube-controller-manager kube-scheduler coredns; do daemon_alive "${d}" || return 1; done
  for n in $(seq 1 "${NODE_COUNT}"); do
    for d in containerd kubelet kube-proxy; do daemon_alive "${d}-${n}" || return 1; done
  done
  network_intact || return 1
  kubectl_admin get --raw /readyz >/dev/null 2>&1 || return 1
  [[ "$(ready_node_count)" == "${NODE_COUNT}" ]]
}

publish_kubeconfig() {
  mkdir -p "${OUT_DIR}"
  install -m 600 "${PKI_DIR}/admin.kubeconfig" "${KUBECONFIG_OUT}"
}

# Any trace of an earlier cluster: its state dir, bridge or node namespaces.
leftovers_exist() {
  [[ -d "${CLUSTER_DIR}" ]] && return 0
  ip link show "${BRIDGE}" >/dev/null 2>&1 && return 0
  compgen -G "/run/netns/hvx-node-*" >/dev/null
}

start=$(date +%s)
if [[ -d "${CLUSTER_DIR}" ]] && cluster_healthy; then
  publish_kubeconfig
  log "cluster-up: already up and healthy (${NODE_COUNT} Ready nodes); kubeconfig: ${KUBECONFIG_OUT}"
  exit 0
fi
if leftovers_exist; then
  log "cluster-up: found a broken or partial cluster; tearing it down first"
  "${HARNESS_DIR}/cluster-down.sh"
fi

if [[ -z "${HVX_SKIP_DEPS:-}" ]]; then
  "${REPO_DIR}/hack/install-deps.sh"
fi
"${HARNESS_DIR}/build-k8s.sh"
"${HARNESS_DIR}/build-node-images.sh"

mkdir -p "${CLUSTER_DIR}"
# kubelet overwrites these host sysctls; cluster-down restores them from here.
sysctl vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops \
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes > "${CLUSTER_DIR}/host-sysctls.conf"
log "cluster-up: certificates and kubeconfigs"
generate_pki
setup_network
start_etcd
start_apiserver
start_controllers
start_coredns
wipe_hvx_node_state $(seq 1 "${NODE_COUNT}")
for n in $(seq 1 "${NODE_COUNT}"); do start_node "${n}"; done

log "cluster-up: waiting for ${NODE_COUNT} Ready nodes"
nodes_ready() { [[ "$(ready_node_count)" == "${NODE_COUNT}" ]]; }
if ! wait_for "${NODE_COUNT} Ready nodes" 300 nodes_ready; then
  kubectl_admin get nodes -o wide || true
  die "nodes did not become Ready; logs in ${CLUSTER_DIR}/logs"
fi
publish_kubeconfig
kubectl_admin get nodes -o wide
log "cluster-up: ready in $(( $(date +%s) - start ))s; kubeconfig: ${KUBECONFIG_OUT}"
