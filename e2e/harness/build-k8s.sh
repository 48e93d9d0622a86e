#!/usr/bin/env bash
# Builds the pinned Kubernetes components, etcd, helm, kind and CoreDNS from their Go
# modules into ${HVX_CACHE}/k8s/<version>/bin. A warm run (all binaries
# present, stamps matching versions and k8s/go.sum) returns at once.
set -euo pipefail
HARNESS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "${HARNESS_DIR}/versions.env"

HVX_CACHE="${HVX_CACHE:-/var/cache/hvx}"
BIN_DIR="${HVX_CACHE}/k8s/${K8S_VERSION}/bin"

K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet kubectl)

# Go is preinstalled in /usr/local/go on these machines; it may not be on PATH.
command -v go >/dev/null || export PATH="${PATH}:/usr/local/go/bin"
command -v go >/dev/null || { echo "build-k8s: no Go toolchain (need go >= 1.24)" >&2; exit 1; }
export GOMODCACHE="${HVX_CACHE}/gomod"
export GOCACHE="${HVX_CACHE}/go-build"
# k8s/go.mod and go.sum are tidy and committed: never let the build rewrite them.
export GOFLAGS="-mod=readonly -buildvcs=false"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
# Two cores shared with other work: keep the compiler to two packages at a time.
export GOMAXPROCS="${GOMAXPROCS:-2}"

# Each group of binaries has its own stamp (what it was built from), so bumping
# one version rebuilds only that group.
k8s_stamp() { printf '%s %s\n' "${K8S_VERSION}" "$(sha256sum "${HARNESS_DIR}/k8s/go.sum" | cut -d' ' -f1)"; }

# up_to_date GROUP STAMP BINARY...: true when every binary exists and the
# group's stamp file says STAMP.
up_to_date() {
  local group="$1" stamp="$2" b; shift 2
  for b in "$@"; do [[ -x "${BIN_DIR}/${b}" ]] || return 1; done
  [[ -f "${BIN_DIR}/.stamp-${group}" && "$(cat "${BIN_DIR}/.stamp-${group}")" == "${stamp}" ]]
}

if up_to_date k8s "$(k8s_stamp)" "${K8S_BINS[@]}" etcd && up_to_date helm "${HELM_VERSION}" helm \
  && up_to_date kind "${KIND_VERSION}" kind && up_to_date coredns "${COREDNS_VERSION}" coredns; then
  echo "build-k8s: cached binaries in ${BIN_DIR}"
  exit 0
fi

mkdir -p "${BIN_DIR}" "${GOMODCACHE}" "${GOCACHE}"
start=$(date +%s)
pkg=k8s.io/component-base/version
cpkg=k8s.io/client-go/pkg/version
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
build_date="$(date -u -d @"${SOURCE_DATE_EPOCH:-0}" +%Y-%m-%dT%H:%M:%SZ)"
ldflags="-s -w"
for p in "${pkg}" "${cpkg}"; do
  ldflags+=" -X ${p}.gitVersion=${K8S_VERSION} -X ${p}.gitMajor=1 -X ${p}.gitMinor=${minor}"
  ldflags+=" -X ${p}.gitTreeState=clean -X ${p}.buildDate=${build_date}"
done

if ! up_to_date k8s "$(k8s_stamp)" "${K8S_BINS[@]}" etcd; then
  echo "build-k8s: building Kubernetes ${K8S_VERSION} components and etcd (cold build takes ~11 min on 2 cores)"
  (
    cd "${HARNESS_DIR}/k8s"
    pkgs=()
    for b in "${K8S_BINS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/${b}"); done
    go build -p 2 -trimpath -ldflags "${ldflags}" -o "${BIN_DIR}/" "${pkgs[@]}" ./cmd/etcd
  )
  k8s_stamp > "${BIN_DIR}/.stamp-k8s"
fi
if ! up_to_date helm "${HELM_VERSION}" helm; then
  echo "build-k8s: building helm ${HELM_VERSION}"
  GOBIN="${BIN_DIR}" go install -p 2 -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
    "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
  echo "${HELM_VERSION}" > "${BIN_DIR}/.stamp-helm"
fi
if ! up_to_date kind "${KIND_VERSION}" kind; then
  echo "build-k8s: building kind ${KIND_VERSION}"
  GOBIN="${BIN_DIR}" go install -p 2 -trimpath -ldflags "-s -w" "sigs.k8s.io/kind@${KIND_VERSION}"
  echo "${KIND_VERSION}" > "${BIN_DIR}/.stamp-kind"
fi
if ! up_to_date coredns "${COREDNS_VERSION}" coredns; then
  echo "build-k8s: building coredns ${COREDNS_VERSION}"
  GOBIN="${BIN_DIR}" go install -p 2 -trimpath -ldflags "-s -w" "github.com/coredns/coredns@${COREDNS_VERSION}"
  echo "${COREDNS_VERSION}" > "${BIN_DIR}/.stamp-coredns"
fi
echo "build-k8s: done in $(( $(date +%s) - start ))s -> ${BIN_DIR}"
