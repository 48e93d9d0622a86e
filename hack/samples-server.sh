#!/usr/bin/env bash
# Serves the sample VMware guest disk inside the local cluster, where examples/ point:
# http://hvx-samples.hvx-samples.svc:8080/sample-guest-stream.vmdk (a streamOptimized
# VMDK, as vSphere exports it). A busybox httpd pod reads it from the host's guest
# cache (hostPath): this is for the local cluster, whose nodes share this host.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/harness/versions.env
BIN="${HVX_CACHE:-/var/cache/hvx}/k8s/${K8S_VERSION}/bin"
KUBECTL="${BIN}/kubectl"
export KUBECONFIG="${KUBECONFIG:-$PWD/_out/kubeconfig}"
GUEST="$(hack/build-guest.sh | tail -1)"
[[ -f "${GUEST}/disk-stream.vmdk" ]] || { echo "samples: no guest disk in ${GUEST}" >&2; exit 1; }
IMAGE="${HVX_TEST_IMAGE:-localhost/hvx-e2e-busybox:1}"
SAMPLES_IP="${HVX_SAMPLES_IP:-10.252.0.250}"
# clusterIP is immutable: a Service made with another address is replaced.
current="$("$KUBECTL" -n hvx-samples get service hvx-samples -o jsonpath='{.spec.clusterIP}' 2>/dev/null || true)"
if [[ -n "${current}" && "${current}" != "${SAMPLES_IP}" ]]; then
  "$KUBECTL" -n hvx-samples delete service hvx-samples >/dev/null
fi
"$KUBECTL" create namespace hvx-samples --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
"$KUBECTL" apply --server-side --field-manager=hvx-samples -f - >/dev/null <<YAML
apiVersion: apps/v1
kind: Deployment
metadata:
  name: hvx-samples
  namespace: hvx-samples
spec:
  replicas: 1
  selector:
    matchLabels: {app.kubernetes.io/name: hvx-samples}
  template:
    metadata:
      labels: {app.kubernetes.io/name: hvx-samples}
    spec:
      containers:
        - name: httpd
          image: ${IMAGE}
          imagePullPolicy: Never
          command: ["httpd", "-f", "-p", "8080", "-h", "/samples"]
          ports: [{containerPort: 8080}]
          readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 2}
          volumeMounts:
            - {name: disk, mountPath: /samples/sample-guest-stream.vmdk, readOnly: true}
      volumes:
        - name: disk
          hostPath: {path: ${GUEST}/disk-stream.vmdk, type: File}
---
apiVersion: v1
kind: Service
metadata:
  name: hvx-samples
  namespace: hvx-samples
spec:
  # A fixed address: agents fetch http sources only from addresses the chart allows,
  # and hack/helm-install.sh allows this one (agent.httpSources.allowCIDRs).
  clusterIP: ${SAMPLES_IP}
  selector: {app.kubernetes.io/name: hvx-samples}
  ports: [{port: 8080, targetPort: 8080}]
YAML
# A Deployment: drains in the e2e move it instead of deleting it.
"$KUBECTL" -n hvx-samples delete pod hvx-samples --ignore-not-found >/dev/null
"$KUBECTL" -n hvx-samples rollout status deployment/hvx-samples --timeout=120s >/dev/null
echo "samples: http://hvx-samples.hvx-samples.svc:8080/sample-guest-stream.vmdk ($(stat -c %s "${GUEST}/disk-stream.vmdk") bytes)"
