# Shared settings and helpers of the local test cluster harness.
# Sourced by cluster-up.sh, cluster-down.sh and the image scripts.
# shellcheck shell=bash
# shellcheck disable=SC2034 # settings used by the scripts that source this file

HARNESS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_DIR="$(cd "${HARNESS_DIR}/../.." && pwd)"
# shellcheck source=../versions.env
source "${HARNESS_DIR}/versions.env"

HVX_CACHE="${HVX_CACHE:-/var/cache/hvx}"
BIN_DIR="${HVX_CACHE}/k8s/${K8S_VERSION}/bin"
# Everything the running cluster owns lives below CLUSTER_DIR (state, certs, logs,
# node roots); cluster-down removes it all.
CLUSTER_DIR="${HVX_CLUSTER_DIR:-/var/lib/hvx-cluster}"
OUT_DIR="${REPO_DIR}/_out"
KUBECONFIG_OUT="${OUT_DIR}/kubeconfig"
NODE_COUNT="${HVX_NODES:-3}"

# Addresses: all inside namespaces and a bridge this harness creates.
BRIDGE=hvxbr0
BRIDGE_IP=172.31.250.1            # root-namespace end: apiserver listens here
NODE_NET_PREFIX=172.31.250        # node N is ${NODE_NET_PREFIX}.$((10+N))/24
POD_NET_PREFIX=10.251             # node N's pods are ${POD_NET_PREFIX}.N.0/24
CLUSTER_CIDR=10.251.0.0/16
SERVICE_CIDR=10.252.0.0/24
APISERVER_PORT=6443
ETCD_CLIENT_PORT=23790            # not the default 2379: a host etcd may run
ETCD_PEER_PORT=23800

node_name() { echo "hvx-node-$1"; }
node_ip() { echo "${NODE_NET_PREFIX}.$((10 + $1))"; }
node_pod_cidr() { echo "${POD_NET_PREFIX}.$1.0/24"; }
node_dir() { echo "${CLUSTER_DIR}/nodes/$1"; }
node_netns() { node_name "$1"; }
# The kubelet's --root-dir, keyed by node name: the hvx agent of a node finds its own
# kubelet's plugins_registry as <parent>/$(NODE_NAME) (chart value
# agent.kubelet.perNodeRootParent, set by hack/helm-install.sh).
KUBELET_ROOT_PARENT="${CLUSTER_DIR}/kubelets"
node_kubelet_root() { echo "${KUBELET_ROOT_PARENT}/$(node_name "$1")"; }

# hvx's per-node host directories (the chart's storePath and run root, keyed by node
# name): a node of this harness is new at every cluster-up, so whatever an earlier
# cluster's agents left there (networks they would re-apply, overlays, VM run dirs) is
# stale and must not reach the new one.
HVX_NODE_ROOTS=(/var/lib/hvx/nodes /run/hvx/nodes)
wipe_hvx_node_state() {
  local n root
  for n in "$@"; do
    for root in "${HVX_NODE_ROOTS[@]}"; do
      rm -rf --one-file-system "${root:?}/$(node_name "${n}")"
    done
  done
  for root in "${HVX_NODE_ROOTS[@]}"; do rmdir "${root}" 2>/dev/null || true; done
}
node_veth() { echo "hvxv$1"; }
# Per-node cgroup (below every v1 controller): kubelet's cgroupRoot, and the
# cgroup containerd, its shims and kubelet run in, so cleanup finds them all.
node_cgroup() { echo "hvx-node-$1"; }
CGROUP_CONTROLLERS=(cpu cpuacct cpuset memory devices freezer blkio pids systemd)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }

kubectl_admin() { "${BIN_DIR}/kubectl" --kubeconfig "${CLUSTER_DIR}/pki/admin.kubeconfig" "$@"; }

# wait_for DESCRIPTION TIMEOUT_SECONDS COMMAND...: polls COMMAND once a second.
wait_for() {
  local what="$1" timeout="$2"; shift 2
  local deadline=$(( $(date +%s) + timeout ))
  until "$@" >/dev/null 2>&1; do
    if (( $(date +%s) >= deadline )); then
      log "timed out after ${timeout}s waiting for ${what}"
      return 1
    fi
    sleep 1
  done
}

# start_daemon NAME CGROUP_OR_EMPTY NETNS_OR_EMPTY COMMAND...: starts COMMAND in the
# background with its log in ${CLUSTER_DIR}/logs/NAME.log and pid in run/NAME.pid.
# nsenter --net (not `ip netns exec`) keeps the host mount namespace, so kubelet's
# volume mounts are visible to containerd and runc.
start_daemon() {
  local name="$1" cgroup="$2" netns="$3"; shift 3
  local pidfile="${CLUSTER_DIR}/run/${name}.pid" logfile="${CLUSTER_DIR}/logs/${name}.log"
  mkdir -p "${CLUSTER_DIR}/run" "${CLUSTER_DIR}/logs"
  local prefix=()
  [[ -n "${netns}" ]] && prefix=(nsenter "--net=/run/netns/${netns}")
  (
    if [[ -n "${cgroup}" ]]; then
      local c
      for c in "${CGROUP_CONTROLLERS[@]}"; do
        mkdir -p "/sys/fs/cgroup/${c}/${cgroup}/daemons"
        if [[ "${c}" == cpuset ]]; then
          cat /sys/fs/cgroup/cpuset/cpuset.cpus > "/sys/fs/cgroup/cpuset/${cgroup}/cpuset.cpus"
          cat /sys/fs/cgroup/cpuset/cpuset.mems > "/sys/fs/cgroup/cpuset/${cgroup}/cpuset.mems"
          cat /sys/fs/cgroup/cpuset/cpuset.cpus > "/sys/fs/cgroup/cpuset/${cgroup}/daemons/cpuset.cpus"
          cat /sys/fs/cgroup/cpuset/cpuset.mems > "/sys/fs/cgroup/cpuset/${cgroup}/daemons/cpuset.mems"
        fi
        echo "${BASHPID}" > "/sys/fs/cgroup/${c}/${cgroup}/daemons/cgroup.procs"
      done
    fi
    exec setsid "${prefix[@]}" "$@" </dev/null >>"${logfile}" 2>&1
  ) &
  echo $! > "${pidfile}"
}

# pid_is_ours PID: the process is one of this harness's daemons. Every daemon's
# command line names a file below CLUSTER_DIR; this guards against a recycled pid.
pid_is_ours() {
  [[ "$1" =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -qF "${CLUSTER_DIR}/"
}

daemon_alive() {
  local pidfile="${CLUSTER_DIR}/run/$1.pid"
  [[ -f "${pidfile}" ]] && pid_is_ours "$(cat "${pidfile}")"
}

# import_image SOCKET TAR: imports a docker-archive into a node's containerd
# (k8s.io namespace). Retried: replacing a tag can race containerd's garbage
# collection of the old layers ("parent snapshot ... does not exist").
import_image() {
  local sock="$1" tar="$2" attempt
  for attempt in 1 2 3; do
    if ctr --address "${sock}" -n k8s.io images import "${tar}" >/dev/null 2>"${CLUSTER_DIR}/import.err"; then
      return 0
    fi
    sleep "${attempt}"
  done
  cat "${CLUSTER_DIR}/import.err" >&2
  return 1
}

# Cluster DNS: CoreDNS as a host process on the bridge address, answering only
# for the cluster's zones (nothing is forwarded off the machine).
CLUSTER_DOMAIN=cluster.local
DNS_IP="${BRIDGE_IP}"
