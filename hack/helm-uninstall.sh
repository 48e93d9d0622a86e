#!/usr/bin/env bash
# `helm uninstall hvx`, then checks it left nothing: no hvx custom resources or CRDs,
# no pods in the release namespace, no hvx node labels, and on each local-cluster node
# no hvx links (hvb*/hvv*/hvt*, and hvg*/hvu*, the node ends of the networks' gateway
# and transit veths, which go only with their gateway namespaces), no hvx nftables
# tables, no dnsmasq of hvx, no gateway namespace (hvx-n-*) and no files under the
# node's hvx directories.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/harness/versions.env
source e2e/harness/lib/common.sh
BIN="${HVX_CACHE:-/var/cache/hvx}/k8s/${K8S_VERSION}/bin"
HELM="${BIN}/helm"; KUBECTL="${BIN}/kubectl"
export KUBECONFIG="${KUBECONFIG:-$PWD/_out/kubeconfig}"
NS="${HVX_NAMESPACE:-hvx-system}"

if "$HELM" status hvx -n "${NS}" >/dev/null 2>&1; then
  log "helm uninstall hvx -n ${NS}"
  "$HELM" uninstall hvx -n "${NS}" --wait --timeout 10m
fi
left=()
for crd in $("$KUBECTL" get crd -o name | grep 'hvx.dev' || true); do left+=("$crd"); done
deadline=$(( $(date +%s) + 120 ))
while [ -n "$("$KUBECTL" -n "${NS}" get pods --no-headers 2>/dev/null)" ] && (( $(date +%s) < deadline )); do sleep 2; done
pods=$("$KUBECTL" -n "${NS}" get pods --no-headers 2>/dev/null || true)
[ -n "$pods" ] && left+=("pods in ${NS}: ${pods}")
labelled=$("$KUBECTL" get nodes -l 'hvx.dev/agent' -o name 2>/dev/null || true)
[ -n "$labelled" ] && left+=("node labels on: ${labelled}")
for n in $(seq 1 "${NODE_COUNT}"); do
  ns=$(node_netns "$n"); node=$(node_name "$n")
  ip netns list | grep -qw "$ns" || continue
  links=$(ip -n "$ns" -o link show | awk -F': ' '{print $2}' | grep -E '^(hvb|hvv|hvt|hvg|hvu)' || true)
  [ -n "$links" ] && left+=("links on ${node}: ${links//$'\n'/ }")
  tables=$(ip netns exec "$ns" nft list tables 2>/dev/null | grep -E 'hvx' || true)
  [ -n "$tables" ] && left+=("nftables on ${node}: ${tables//$'\n'/ }")
  for root in /var/lib/hvx /run/hvx; do
    files=$(find "${root}/nodes/${node}" -type f 2>/dev/null | head -5 || true)
    [ -n "$files" ] && left+=("files on ${node}: ${files//$'\n'/ }")
  done
done
# Gateway namespaces are named in the agent containers' own /run; one named on the
# host means an agent ran outside its pod and left it.
gwns=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^hvx-n-[0-9]+$' || true)
[ -n "$gwns" ] && left+=("gateway namespaces: ${gwns//$'\n'/ }")
dns=$(pgrep -a dnsmasq | grep -E '/run/hvx/' || true)
[ -n "$dns" ] && left+=("dnsmasq: ${dns}")
if [ ${#left[@]} -gt 0 ]; then
  log "helm uninstall left:"; printf '  %s\n' "${left[@]}"; exit 1
fi
log "helm uninstall left nothing (CRs, CRDs, pods, node labels, links, nftables, gateway namespaces, dnsmasq, files)"
