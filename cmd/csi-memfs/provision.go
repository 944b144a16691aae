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
// in $POD_NAMESPACE, owned by the pod $POD_NAME ($POD_UID), so they go
// with the pod.
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
	var owner *metav1.OwnerReference
	if name, uid := os.Getenv("POD_NAME"), os.Getenv("POD_UID"); name != "" && uid != "" {
		owner = &metav1.OwnerReference{APIVersion: "v1", Kind: "Pod", Name: name, UID: types.UID(uid)}
	}
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
