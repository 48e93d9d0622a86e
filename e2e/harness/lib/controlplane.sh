# etcd and the Kubernetes control plane, as processes in the root network namespace.
# shellcheck shell=bash

start_etcd() {
  log "starting etcd (TLS, 127.0.0.1:${ETCD_CLIENT_PORT})"
  mkdir -p "${CLUSTER_DIR}/etcd"
  chmod 700 "${CLUSTER_DIR}/etcd"
  start_daemon etcd "" "" "${BIN_DIR}/etcd" \
    --name hvx-etcd \
    --data-dir "${CLUSTER_DIR}/etcd" \
    --listen-client-urls "https://127.0.0.1:${ETCD_CLIENT_PORT}" \
    --advertise-client-urls "https://127.0.0.1:${ETCD_CLIENT_PORT}" \
    --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-cluster "hvx-etcd=http://127.0.0.1:${ETCD_PEER_PORT}" \
    --listen-metrics-urls "" \
    --cert-file "${PKI_DIR}/etcd-server.crt" --key-file "${PKI_DIR}/etcd-server.key" \
    --client-cert-auth --trusted-ca-file "${PKI_DIR}/ca.crt" \
    --quota-backend-bytes 2147483648 --snapshot-count 10000 \
    --unsafe-no-fsync
  wait_for "etcd health" 60 curl -sf --cacert "${PKI_DIR}/ca.crt" \
    --cert "${PKI_DIR}/apiserver-etcd-client.crt" --key "${PKI_DIR}/apiserver-etcd-client.key" \
    "https://127.0.0.1:${ETCD_CLIENT_PORT}/health" || die "etcd did not become healthy (see ${CLUSTER_DIR}/logs/etcd.log)"
}

start_apiserver() {
  log "starting kube-apiserver (https://${BRIDGE_IP}:${APISERVER_PORT})"
  start_daemon kube-apiserver "" "" "${BIN_DIR}/kube-apiserver" \
    --bind-address "${BRIDGE_IP}" --advertise-address "${BRIDGE_IP}" --secure-port "${APISERVER_PORT}" \
    --etcd-servers "https://127.0.0.1:${ETCD_CLIENT_PORT}" \
    --etcd-cafile "${PKI_DIR}/ca.crt" \
    --etcd-certfile "${PKI_DIR}/apiserver-etcd-client.crt" --etcd-keyfile "${PKI_DIR}/apiserver-etcd-client.key" \
    --tls-cert-file "${PKI_DIR}/apiserver.crt" --tls-private-key-file "${PKI_DIR}/apiserver.key" \
    --client-ca-file "${PKI_DIR}/ca.crt" \
    --kubelet-client-certificate "${PKI_DIR}/apiserver-kubelet-client.crt" \
    --kubelet-client-key "${PKI_DIR}/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP \
    --service-account-issuer "https://kubernetes.default.svc.cluster.local" \
    --service-account-key-file "${PKI_DIR}/sa.pub" \
    --service-account-signing-key-file "${PKI_DIR}/sa.key" \
    --service-cluster-ip-range "${SERVICE_CIDR}" \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction \
    --allow-privileged=true \
    --enable-aggregator-routing=true \
    --requestheader-client-ca-file "${PKI_DIR}/ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User \
    --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "${PKI_DIR}/front-proxy-client.crt" \
    --proxy-client-key-file "${PKI_DIR}/front-proxy-client.key" \
    --profiling=false \
    --v 1
  wait_for "kube-apiserver readiness" 180 kubectl_admin get --raw /readyz \
    || die "kube-apiserver did not become ready (see ${CLUSTER_DIR}/logs/kube-apiserver.log)"
}

start_controllers() {
  log "starting kube-controller-manager and kube-scheduler"
  start_daemon kube-controller-manager "" "" "${BIN_DIR}/kube-controller-manager" \
    --kubeconfig "${PKI_DIR}/controller-manager.kubeconfig" \
    --authentication-kubeconfig "${PKI_DIR}/controller-manager.kubeconfig" \
    --authorization-kubeconfig "${PKI_DIR}/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 \
    --root-ca-file "${PKI_DIR}/ca.crt" \
    --service-account-private-key-file "${PKI_DIR}/sa.key" \
    --cluster-signing-cert-file "${PKI_DIR}/ca.crt" --cluster-signing-key-file "${PKI_DIR}/ca.key" \
    --use-service-account-credentials \
    --service-cluster-ip-range "${SERVICE_CIDR}" \
    --allocate-node-cidrs=false \
    --leader-elect=false \
    --v 1
  start_daemon kube-scheduler "" "" "${BIN_DIR}/kube-scheduler" \
    --kubeconfig "${PKI_DIR}/scheduler.kubeconfig" \
    --authentication-kubeconfig "${PKI_DIR}/scheduler.kubeconfig" \
    --authorization-kubeconfig "${PKI_DIR}/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 \
    --leader-elect=false \
    --v 1
  wait_for "kube-controller-manager health" 120 curl -skf https://127.0.0.1:10257/healthz \
    || die "kube-controller-manager not healthy (see ${CLUSTER_DIR}/logs/kube-controller-manager.log)"
  wait_for "kube-scheduler health" 120 curl -skf https://127.0.0.1:10259/healthz \
    || die "kube-scheduler not healthy (see ${CLUSTER_DIR}/logs/kube-scheduler.log)"
}
