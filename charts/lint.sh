#!/usr/bin/env bash
# Lints the Helm chart and validates every rendered manifest against the Kubernetes
# API schema of the local cluster (server-side dry run with strict field validation:
# unknown or mistyped fields fail, CRD objects included).
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/harness/versions.env
BIN="${HVX_CACHE:-/var/cache/hvx}/k8s/${K8S_VERSION}/bin"
HELM="${BIN}/helm"; KUBECTL="${BIN}/kubectl"
[ -x "$HELM" ] || e2e/harness/build-k8s.sh
export KUBECONFIG="${KUBECONFIG:-$PWD/_out/kubeconfig}"

# The chart's appVersion (the default image tag) follows the release: the workspace version.
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
app_version=$(sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/hvx/Chart.yaml)
[ "$version" = "$app_version" ] || { echo "chart-lint: Chart.yaml appVersion ${app_version} != workspace version ${version}" >&2; exit 1; }
echo "chart-lint: helm lint"
"$HELM" lint --strict charts/hvx
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
"$HELM" template hvx charts/hvx --kube-version "${K8S_VERSION#v}" --namespace hvx-system >"$out/rendered.yaml"
# Values outside the schema must be refused.
if "$HELM" template hvx charts/hvx --kube-version "${K8S_VERSION#v}" --set images.pullPolicy=Sometimes >/dev/null 2>&1; then
  echo "chart-lint: values.schema.json accepted an invalid pullPolicy" >&2; exit 1
fi
echo "chart-lint: server-side validation of $(grep -c '^kind:' "$out/rendered.yaml") objects"
# CRDs first so objects of their kinds can be validated too.
"$HELM" template hvx charts/hvx --kube-version "${K8S_VERSION#v}" --namespace hvx-system --show-only templates/crds.yaml >"$out/crds.yaml"
"$KUBECTL" apply --server-side --field-manager=hvx-chart-lint -f "$out/crds.yaml" >/dev/null
"$KUBECTL" create namespace hvx-system --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
"$KUBECTL" apply --dry-run=server --validate=strict -f "$out/rendered.yaml" >/dev/null
echo "chart-lint: ok"
