// Command etcd is the upstream etcd server, built from the go.etcd.io/etcd/server/v3
// module at the version Kubernetes itself pins (Debian's etcd 3.4 is older than
// the 3.5+ that kube-apiserver 1.34 supports).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
