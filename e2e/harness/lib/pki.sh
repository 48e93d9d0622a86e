# Certificates and kubeconfigs of the local cluster: one CA, real TLS everywhere.
# shellcheck shell=bash

PKI_DIR="${CLUSTER_DIR}/pki"

# issue_cert NAME SUBJECT [SANS]: key + cert signed by the cluster CA, for
# client and server use. SANS is an openssl subjectAltName list.
issue_cert() {
  local name="$1" subject="$2" sans="${3:-}"
  local ext="${PKI_DIR}/${name}.ext"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [[ -n "${sans}" ]] && echo "subjectAltName=${sans}"
  } > "${ext}"
  openssl ecparam -name prime256v1 -genkey -noout -out "${PKI_DIR}/${name}.key" 2>/dev/null
  openssl req -new -key "${PKI_DIR}/${name}.key" -subj "${subject}" -out "${PKI_DIR}/${name}.csr"
  openssl x509 -req -in "${PKI_DIR}/${name}.csr" -CA "${PKI_DIR}/ca.crt" -CAkey "${PKI_DIR}/ca.key" \
    -CAcreateserial -days 365 -sha256 -extfile "${ext}" -out "${PKI_DIR}/${name}.crt" 2>/dev/null
  rm -f "${PKI_DIR}/${name}.csr" "${ext}"
}

# write_kubeconfig FILE USER_CERT_NAME SERVER
write_kubeconfig() {
  local file="$1" user="$2" server="$3"
  cat > "${file}" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: hvx
  cluster:
    server: ${server}
    certificate-authority-data: $(base64 -w0 "${PKI_DIR}/ca.crt")
users:
- name: ${user}
  user:
    client-certificate-data: $(base64 -w0 "${PKI_DIR}/${user}.crt")
    client-key-data: $(base64 -w0 "${PKI_DIR}/${user}.key")
contexts:
- name: hvx
  context: {cluster: hvx, user: ${user}}
current-context: hvx
KCFG
  chmod 600 "${file}"
}

generate_pki() {
  local server="https://${BRIDGE_IP}:${APISERVER_PORT}"
  mkdir -p "${PKI_DIR}"
  chmod 700 "${PKI_DIR}"
  openssl ecparam -name prime256v1 -genkey -noout -out "${PKI_DIR}/ca.key" 2>/dev/null
  openssl req -x509 -new -key "${PKI_DIR}/ca.key" -subj "/CN=hvx-local-cluster-ca" -days 365 \
    -sha256 -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out "${PKI_DIR}/ca.crt"
  issue_cert etcd-server "/CN=etcd" "IP:127.0.0.1,DNS:localhost"
  issue_cert apiserver-etcd-client "/CN=kube-apiserver-etcd-client"
  issue_cert apiserver "/CN=kube-apiserver" \
    "IP:${BRIDGE_IP},IP:127.0.0.1,IP:${SERVICE_CIDR%.0/24}.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  issue_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  issue_cert admin "/O=system:masters/CN=hvx-admin"
  issue_cert controller-manager "/CN=system:kube-controller-manager"
  issue_cert scheduler "/CN=system:kube-scheduler"
  issue_cert kube-proxy "/CN=system:kube-proxy"
  issue_cert coredns "/CN=hvx:coredns"
  # The apiserver's identity towards aggregated API servers (request-header auth).
  issue_cert front-proxy-client "/CN=front-proxy-client"
  # Service-account token signing key pair.
  openssl genrsa -out "${PKI_DIR}/sa.key" 2048 2>/dev/null
  openssl rsa -in "${PKI_DIR}/sa.key" -pubout -out "${PKI_DIR}/sa.pub" 2>/dev/null
  write_kubeconfig "${PKI_DIR}/admin.kubeconfig" admin "${server}"
  write_kubeconfig "${PKI_DIR}/controller-manager.kubeconfig" controller-manager "${server}"
  write_kubeconfig "${PKI_DIR}/scheduler.kubeconfig" scheduler "${server}"
  write_kubeconfig "${PKI_DIR}/kube-proxy.kubeconfig" kube-proxy "${server}"
  write_kubeconfig "${PKI_DIR}/coredns.kubeconfig" coredns "${server}"
  local n name
  for n in $(seq 1 "${NODE_COUNT}"); do
    name="$(node_name "${n}")"
    issue_cert "kubelet-${n}" "/O=system:nodes/CN=system:node:${name}"
    write_kubeconfig "${PKI_DIR}/kubelet-${n}.kubeconfig" "kubelet-${n}" "${server}"
  done
}
