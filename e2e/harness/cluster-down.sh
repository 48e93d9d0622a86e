#!/usr/bin/env bash
# Removes everything cluster-up made: processes (by pid file and by membership
# of the per-node cgroups), pod and node network namespaces, the bridge, mounts,
# cgroups, ${HVX_CLUSTER_DIR} and _out/kubeconfig. Safe to run any number of times;
# exits non-zero if something could not be removed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

[[ "$(id -u)" == 0 ]] || die "cluster-down needs root"

# stop_daemons NAME...: SIGTERM the daemons started under these names, wait up
# to 10 s for all of them, then SIGKILL what is left.
stop_daemons() {
  local name pidfile pids=() pid alive
  for name in "$@"; do
    pidfile="${CLUSTER_DIR}/run/${name}.pid"
    [[ -f "${pidfile}" ]] || continue
    pid="$(cat "${pidfile}")"
    if pid_is_ours "${pid}"; then
      kill -TERM "${pid}" 2>/dev/null && pids+=("${pid}")
    fi
    rm -f "${pidfile}"
  done
  for _ in $(seq 1 40); do
    alive=()
    for pid in "${pids[@]}"; do kill -0 "${pid}" 2>/dev/null && alive+=("${pid}"); done
    [[ ${#alive[@]} -eq 0 ]] && return 0
    sleep 0.25
  done
  kill -KILL "${alive[@]}" 2>/dev/null || true
}

cgroup_pids() {
  local cg="$1"
  [[ -d "/sys/fs/cgroup/pids/${cg}" ]] || return 0
  find "/sys/fs/cgroup/pids/${cg}" -name cgroup.procs -exec cat {} + 2>/dev/null
}

# kill_cgroup CGROUP: SIGKILL every process in the node's cgroup tree
# (containerd, shims, containers) until none is left.
kill_cgroup() {
  local cg="$1" pids
  for _ in $(seq 1 50); do
    pids="$(cgroup_pids "${cg}")"
    [[ -z "${pids}" ]] && return 0
    # shellcheck disable=SC2086
    kill -KILL ${pids} 2>/dev/null || true
    sleep 0.2
  done
  log "cluster-down: processes still in cgroup ${cg}: $(cgroup_pids "${cg}" | tr '\n' ' ')"
}

remove_cgroup() {
  local cg="$1" c
  # runc also makes the cgroup in the v2 "unified" hierarchy of this hybrid setup.
  for c in "${CGROUP_CONTROLLERS[@]}" unified; do
    [[ -d "/sys/fs/cgroup/${c}/${cg}" ]] || continue
    find "/sys/fs/cgroup/${c}/${cg}" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

our_mounts() {
  # Mount points below CLUSTER_DIR, deepest first.
  awk -v d="${CLUSTER_DIR}/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r -u
}

# Nodes: the configured count plus any other node this harness left behind
# (for instance from a run with a different HVX_NODES).
mapfile -t nodes < <(
  {
    seq 1 "${NODE_COUNT}"
    for p in /run/netns/hvx-node-* /sys/fs/cgroup/pids/hvx-node-* "${CLUSTER_DIR}"/nodes/*; do
      [[ -e "${p}" ]] && basename "${p}" | sed 's/^hvx-node-//'
    done
  } | grep -E '^[0-9]+$' | sort -nu
)
log "cluster-down: stopping kubelets and kube-proxies"
stop_daemons "${nodes[@]/#/kubelet-}" "${nodes[@]/#/kube-proxy-}"
log "cluster-down: stopping containerd, shims and containers"
stop_daemons "${nodes[@]/#/containerd-}"
for n in "${nodes[@]}"; do kill_cgroup "$(node_cgroup "${n}")"; done
log "cluster-down: stopping control plane and etcd"
stop_daemons coredns kube-scheduler kube-controller-manager kube-apiserver
stop_daemons etcd

# kubelet sets vm.overcommit_memory, kernel.panic and kernel.panic_on_oops (no way
# to opt out); put back what the host had before cluster-up.
if [[ -f "${CLUSTER_DIR}/host-sysctls.conf" ]]; then
  log "cluster-down: restoring host sysctls changed by kubelet"
  sysctl -q -p "${CLUSTER_DIR}/host-sysctls.conf" || log "cluster-down: could not restore some sysctls"
fi

log "cluster-down: unmounting"
for _ in 1 2 3; do
  mapfile -t mounts < <(our_mounts)
  [[ ${#mounts[@]} -eq 0 ]] && break
  for m in "${mounts[@]}"; do umount "${m}" 2>/dev/null || umount -l "${m}" 2>/dev/null || true; done
done

log "cluster-down: network namespaces and bridge"
for n in "${nodes[@]}"; do
  ns="$(node_netns "${n}")"
  if [[ -e "/run/netns/${ns}" ]]; then ip netns del "${ns}" || true; fi
  ip link del "$(node_veth "${n}")" 2>/dev/null || true
done
ip link del "${BRIDGE}" 2>/dev/null || true

for n in "${nodes[@]}"; do remove_cgroup "$(node_cgroup "${n}")"; done
wipe_hvx_node_state "${nodes[@]}"
rm -rf "${CLUSTER_DIR}"
rm -f "${KUBECONFIG_OUT}"
# libcni caches results in /var/lib/cni/results whatever the conf says; ours are
# named after the network of our conflist.
rm -f /var/lib/cni/results/hvx-pods-*
rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null || true

# Verify: nothing of ours is left.
left=()
for n in "${nodes[@]}"; do
  [[ -n "$(cgroup_pids "$(node_cgroup "${n}")")" ]] && left+=("processes in cgroup $(node_cgroup "${n}")")
  [[ -e "/run/netns/$(node_netns "${n}")" ]] && left+=("netns $(node_netns "${n}")")
  for root in "${HVX_NODE_ROOTS[@]}"; do
    [[ -e "${root}/$(node_name "${n}")" ]] && left+=("hvx state ${root}/$(node_name "${n}")")
  done
  for c in "${CGROUP_CONTROLLERS[@]}" unified; do
    [[ -d "/sys/fs/cgroup/${c}/$(node_cgroup "${n}")" ]] && left+=("cgroup ${c}/$(node_cgroup "${n}")")
  done
done
[[ -n "$(our_mounts)" ]] && left+=("mounts under ${CLUSTER_DIR}")
ip link show "${BRIDGE}" >/dev/null 2>&1 && left+=("bridge ${BRIDGE}")
[[ -e "${CLUSTER_DIR}" ]] && left+=("${CLUSTER_DIR}")
if [[ ${#left[@]} -gt 0 ]]; then
  die "cluster-down: left behind: ${left[*]}"
fi
log "cluster-down: clean (no process, netns, mount, cgroup or state left)"
