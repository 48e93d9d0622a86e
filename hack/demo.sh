#!/usr/bin/env bash
# `make demo`: the README's first command. Brings up the local cluster (make does:
# cluster-up, images), installs hvx with Helm, serves the sample VMware guest disk,
# applies the two-VM example and waits until both VMs run with their DHCP addresses,
# then shows how to reach their consoles and how to drain a node.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/harness/versions.env
BIN="${HVX_CACHE:-/var/cache/hvx}/k8s/${K8S_VERSION}/bin"
export KUBECONFIG="${KUBECONFIG:-$PWD/_out/kubeconfig}"
KUBECTL="${BIN}/kubectl"
NS="${HVX_DEMO_NAMESPACE:-hvx-demo}"
say() { printf '\n== %s\n' "$*"; }

say "cluster: $("$KUBECTL" get nodes --no-headers | wc -l) nodes"
"$KUBECTL" get nodes -o wide

say "installing hvx with Helm"
hack/helm-install.sh

say "serving the sample VMware guest disk (streamOptimized VMDK)"
hack/samples-server.sh

say "applying examples/two-vm-app.yaml in namespace ${NS}; waiting for both VMs (disk import, then boot under TCG)"
hack/run-sample.sh "${NS}"

say "what next"
cat <<TXT
Both VMs run on different nodes, joined by the hvx overlay network app-net.
  Console of a VM (root shell; type 'wget -q -O - http://10.77.0.20/' in web):
    cargo run -q -p kubectl-hvx -- -n ${NS} console web   (Ctrl-] detaches)
  Status:            $KUBECTL -n ${NS} get vmapp shop -o yaml
  Drain a node:      $KUBECTL drain <node> --ignore-daemonsets --delete-emptydir-data
                     (its VMs live-migrate: watch $KUBECTL -n ${NS} get vmmig -w;
                      the drain returns when they have left; then $KUBECTL uncordon <node>)
  Migrate by hand:   cargo run -q -p kubectl-hvx -- -n ${NS} migrate web
  Remove the demo:   $KUBECTL delete namespace ${NS}; hack/helm-uninstall.sh
  Tests of every tier: make test.   Tear down the cluster: make cluster-down.
TXT
