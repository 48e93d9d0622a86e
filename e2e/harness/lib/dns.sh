# Cluster DNS: CoreDNS (built from its Go module) in the root namespace, serving
# cluster.local and reverse zones from the apiserver on ${DNS_IP}:53. Other names
# get REFUSED: pods have no resolver off this machine.
# shellcheck shell=bash

start_coredns() {
  log "starting CoreDNS (${DNS_IP}:53, zone ${CLUSTER_DOMAIN})"
  kubectl_admin apply -f - >/dev/null <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "hvx:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "hvx:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "hvx:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "hvx:coredns"}
YAML
  mkdir -p "${CLUSTER_DIR}/coredns"
  cat > "${CLUSTER_DIR}/coredns/Corefile" <<COREFILE
${CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {
    bind ${DNS_IP}
    errors
    health 127.0.0.1:18180
    kubernetes ${CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {
        kubeconfig ${PKI_DIR}/coredns.kubeconfig hvx
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
}
COREFILE
  start_daemon coredns "" "" "${BIN_DIR}/coredns" -conf "${CLUSTER_DIR}/coredns/Corefile"
  wait_for "CoreDNS health" 60 curl -sf http://127.0.0.1:18180/health \
    || die "CoreDNS did not start (see ${CLUSTER_DIR}/logs/coredns.log)"
}
