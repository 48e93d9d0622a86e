#!/usr/bin/env bash
# Installs (or upgrades) hvx with Helm into the cluster $KUBECONFIG names, with the
# images `make images` built and loaded into the local cluster's nodes, and values
# fit for a TCG test cluster (vCPUs overcommitted, images never pulled).
# Waits until the operator runs and every node's agent is ready (node labelled).
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/harness/versions.env
BIN="${HVX_CACHE:-/var/cache/hvx}/k8s/${K8S_VERSION}/bin"
HELM="${BIN}/helm"; KUBECTL="${BIN}/kubectl"
export KUBECONFIG="${KUBECONFIG:-$PWD/_out/kubeconfig}"
NS="${HVX_NAMESPACE:-hvx-system}"
TAG="${HVX_IMAGE_TAG:-dev}"
REGISTRY="${HVX_IMAGE_REGISTRY:-localhost}"
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# CRDs applied before hvx was installed by Helm (kubectl apply -f crds/, tests) are
# adopted into the release rather than deleted: deleting a CRD deletes its objects.
for crd in $("$KUBECTL" get crd -o name | grep '\.hvx\.dev$' || true); do
  if [ -z "$("$KUBECTL" get "$crd" -o jsonpath='{.metadata.annotations.meta\.helm\.sh/release-name}')" ]; then
    log "adopting ${crd} into the Helm release"
    "$KUBECTL" label --overwrite "$crd" app.kubernetes.io/managed-by=Helm >/dev/null
    "$KUBECTL" annotate --overwrite "$crd" meta.helm.sh/release-name=hvx "meta.helm.sh/release-namespace=${NS}" >/dev/null
  fi
done
# Guests' egress NAT refuses the cluster's pod and service ranges: the local harness's
# (e2e/harness/lib/common.sh CLUSTER_CIDR, SERVICE_CIDR) unless the caller says others.
# The harness runs one kubelet per node on this host, each with its own root dir
# (e2e/harness/lib/common.sh node_kubelet_root): each agent registers its CSI driver
# with its own kubelet.
log "helm upgrade --install hvx charts/hvx -n ${NS}"
"$HELM" upgrade --install hvx charts/hvx -n "${NS}" --create-namespace \
  --set images.registry="${REGISTRY}" --set images.tag="${TAG}" --set images.pullPolicy=Never \
  --set images.operator=hvx-operator --set images.agent=hvx-agent --set images.launcher=hvx-launcher \
  --set operator.cpuMillisPerVcpu=10 --set operator.logLevel=info \
  --set "agent.podLogsPath=${HVX_CLUSTER_DIR:-/var/lib/hvx-cluster}/nodes/*/pod-logs" \
  --set agent.podCIDR="${HVX_POD_CIDR:-10.251.0.0/16}" --set agent.serviceCIDR="${HVX_SERVICE_CIDR:-10.252.0.0/24}" \
  --set "agent.httpSources.allowCIDRs={${HVX_SAMPLES_IP:-10.252.0.250}/32}" \
  --set agent.kubelet.perNodeRootParent="${HVX_KUBELET_ROOT_PARENT:-/var/lib/hvx-cluster/kubelets}" \
  --wait --timeout 5m "$@"
# Pods of an upgrade with the same tag keep the old image: restart them.
"$KUBECTL" -n "${NS}" rollout restart deployment/hvx-operator daemonset/hvx-agent >/dev/null
"$KUBECTL" -n "${NS}" rollout status deployment/hvx-operator --timeout=180s
"$KUBECTL" -n "${NS}" rollout status daemonset/hvx-agent --timeout=300s
nodes=$("$KUBECTL" get nodes --no-headers | wc -l)
deadline=$(( $(date +%s) + 300 ))
until [ "$("$KUBECTL" get nodes -l hvx.dev/agent=ready --no-headers 2>/dev/null | wc -l)" -eq "$nodes" ]; do
  if (( $(date +%s) > deadline )); then
    log "agents did not label every node within 300 s:"; "$KUBECTL" get nodes -L hvx.dev/agent,hvx.dev/accelerator,hvx.dev/post-copy
    "$KUBECTL" -n "${NS}" logs daemonset/hvx-agent --tail=30 || true
    exit 1
  fi
  sleep 2
done
"$KUBECTL" get nodes -L hvx.dev/agent,hvx.dev/accelerator,hvx.dev/post-copy
"$KUBECTL" -n "${NS}" get pods -o wide
log "hvx installed"
