// Package e2e tests csi-memfs as operators install it.
//
// Without build tags (part of `make test`): the Helm chart lints, rejects
// bad values with its schema's message, renders what deploy/ holds, and its
// Grafana dashboard queries only series the plugin exports.
//
// With the e2e build tag (`make e2e`, test/e2e/run.sh): a real single-node
// cluster (cluster.sh: etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler, kubelet, containerd) gets the chart installed with Helm,
// and real pods use csi-memfs volumes.
package e2e
