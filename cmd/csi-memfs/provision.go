package main

import (
	"context"
	"errors"
	"fmt"
	"os"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"

	"github.com/csi-memfs/csi-memfs/driver"
	"github.com/csi-memfs/csi-memfs/provisioner"
)

// startProvisioner runs the node's provisioner (serve --provisioner) on
// the in-cluster API until ctx is done. Its CSIStorageCapacity objects live
// in $POD_NAMESPACE, owned by the DaemonSet of the pod $POD_NAME, so they
// outlive a rolling update of the pod and go with the DaemonSet; by the
// pod ($POD_UID) when it has no DaemonSet.
func startProvisioner(ctx context.Context, d *driver.Driver, cfg driver.Config) error {
	rc, err := rest.InClusterConfig()
	if err != nil {
		return fmt.Errorf("--provisioner needs in-cluster API access: %w", err)
	}
	rc.UserAgent = "csi-memfs/" + cfg.Version
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	ns := os.Getenv("POD_NAMESPACE")
	if ns == "" {
		return errors.New("--provisioner needs $POD_NAMESPACE (the namespace of the CSIStorageCapacity objects)")
	}
	// The API server's address, from KUBERNETES_SERVICE_HOST and _PORT:
	// where it leads nowhere (a cluster without kube-proxy, seen from the
	// host network), every call fails and no capacity is published.
	klog.InfoS("Starting the provisioner", "apiServer", rc.Host, "namespace", ns)
	owner := capacityOwner(ctx, client, ns)
	go func() {
		err := provisioner.Run(ctx, provisioner.Config{
			Client:      client,
			Controller:  d,
			DriverName:  cfg.DriverName,
			NodeName:    cfg.NodeID,
			TopologyKey: driver.TopologyKey,
			Namespace:   ns,
			Owner:       owner,
		})
		if err != nil {
			klog.ErrorS(err, "Provisioner stopped")
		}
	}()
	return nil
}

// capacityOwner returns the owner of the node's CSIStorageCapacity
// objects: the DaemonSet controlling the pod $POD_NAME, else the pod, else
// none.
func capacityOwner(ctx context.Context, client kubernetes.Interface, ns string) *metav1.OwnerReference {
	name, uid := os.Getenv("POD_NAME"), os.Getenv("POD_UID")
	if name == "" {
		return nil
	}
	p, err := client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		klog.ErrorS(err, "Cannot read the plugin pod; its CSIStorageCapacity objects are owned by the pod", "pod", klog.KRef(ns, name))
	} else if c := metav1.GetControllerOf(p); c != nil && c.Kind == "DaemonSet" {
		return &metav1.OwnerReference{APIVersion: c.APIVersion, Kind: c.Kind, Name: c.Name, UID: c.UID}
	}
	if uid == "" {
		return nil
	}
	return &metav1.OwnerReference{APIVersion: "v1", Kind: "Pod", Name: name, UID: types.UID(uid)}
}
