package provisioner

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	storagelisters "k8s.io/client-go/listers/storage/v1"
	"k8s.io/klog/v2"
)

// The labels of the node's CSIStorageCapacity objects: they are found by
// them, and a class's object by its name.
const (
	labelDriver = "memfs.csi.dev/driver"
	labelNode   = "memfs.csi.dev/node"
)

// capacityPublisher keeps one CSIStorageCapacity per StorageClass of the
// driver for the node's segment. It runs in one goroutine: no locks.
type capacityPublisher struct {
	// cfg is the configuration. Immutable.
	cfg Config
	// classes lists the StorageClasses from an informer's cache.
	// Immutable.
	classes storagelisters.StorageClassLister
	// written is the capacity each object was last written with, by
	// class; an object is written again only when it changes.
	written map[string]capacity
	// objects are the names of the objects the last sync kept; stale
	// objects are looked for when they change.
	objects map[string]bool
}

// capacity is what one CSIStorageCapacity says.
type capacity struct {
	available, maximum int64
}

func newCapacityPublisher(cfg Config, classes storagelisters.StorageClassLister) *capacityPublisher {
	return &capacityPublisher{cfg: cfg, classes: classes, written: map[string]capacity{}}
}

// refreshEvery is how many intervals pass before every object is read
// and written again whether or not the capacity changed: one deleted
// from outside comes back.
const refreshEvery = 12

// run syncs every CapacityInterval until ctx is done: a publish or
// unpublish reaches the objects within one interval, and an idle node
// writes nothing but every refreshEvery intervals.
func (c *capacityPublisher) run(ctx context.Context) {
	logger := klog.FromContext(ctx)
	t := time.NewTicker(c.cfg.CapacityInterval)
	defer t.Stop()
	for i := 1; ; i++ {
		if i%refreshEvery == 0 {
			clear(c.written)
			c.objects = nil
		}
		if err := c.sync(ctx); err != nil && ctx.Err() == nil {
			logger.Error(err, "Cannot publish the node's storage capacity")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sync writes the node's capacity for every class of the driver, and
// deletes the objects of classes that are gone.
func (c *capacityPublisher) sync(ctx context.Context) error {
	classes, err := c.classes.List(labels.Everything())
	if err != nil {
		return err
	}
	api := c.cfg.Client.StorageV1().CSIStorageCapacities(c.cfg.Namespace)
	ours := map[string]bool{}
	for _, sc := range classes {
		if sc.Provisioner != c.cfg.DriverName {
			continue
		}
		ours[objectName(c.cfg.NodeName, sc.Name)] = true
		resp, err := c.cfg.Controller.GetCapacity(ctx, &csi.GetCapacityRequest{
			Parameters:         sc.Parameters,
			AccessibleTopology: &csi.Topology{Segments: map[string]string{c.cfg.TopologyKey: c.cfg.NodeName}},
		})
		if err != nil {
			// A class with bad parameters: no object, so no node is
			// selected for its claims (CreateVolume would refuse them).
			klog.FromContext(ctx).V(2).Info("No capacity for the class", "storageClass", sc.Name, "err", err)
			delete(ours, objectName(c.cfg.NodeName, sc.Name))
			continue
		}
		want := capacity{available: resp.GetAvailableCapacity(), maximum: resp.GetMaximumVolumeSize().GetValue()}
		if got, ok := c.written[sc.Name]; ok && got == want {
			continue
		}
		if err := c.write(ctx, sc.Name, want); err != nil {
			return err
		}
		c.written[sc.Name] = want
	}
	if c.objects != nil && maps.Equal(c.objects, ours) {
		return nil
	}
	list, err := api.List(ctx, metav1.ListOptions{LabelSelector: labels.SelectorFromSet(c.labels()).String()})
	if err != nil {
		return err
	}
	for _, o := range list.Items {
		if !ours[o.Name] {
			if err := api.Delete(ctx, o.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				return err
			}
			delete(c.written, o.StorageClassName)
		}
	}
	c.objects = ours
	return nil
}

// write creates or updates the class's object. An object of an earlier
// plugin pod is taken over: its owner becomes this one.
func (c *capacityPublisher) write(ctx context.Context, class string, want capacity) error {
	api := c.cfg.Client.StorageV1().CSIStorageCapacities(c.cfg.Namespace)
	o := &storagev1.CSIStorageCapacity{
		ObjectMeta: metav1.ObjectMeta{
			Name:      objectName(c.cfg.NodeName, class),
			Namespace: c.cfg.Namespace,
			Labels:    c.labels(),
		},
		StorageClassName: class,
		NodeTopology:     &metav1.LabelSelector{MatchLabels: map[string]string{c.cfg.TopologyKey: c.cfg.NodeName}},
		Capacity:         resource.NewQuantity(want.available, resource.BinarySI),
	}
	if want.maximum > 0 {
		o.MaximumVolumeSize = resource.NewQuantity(want.maximum, resource.BinarySI)
	}
	if c.cfg.Owner != nil {
		o.OwnerReferences = []metav1.OwnerReference{*c.cfg.Owner}
	}
	old, err := api.Get(ctx, o.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = api.Create(ctx, o, metav1.CreateOptions{})
	case err == nil:
		o.ResourceVersion = old.ResourceVersion
		_, err = api.Update(ctx, o, metav1.UpdateOptions{})
	}
	if err == nil {
		klog.FromContext(ctx).V(3).Info("Published storage capacity", "storageClass", class,
			"capacity", o.Capacity.String(), "node", c.cfg.NodeName)
	}
	return err
}

// labels are the labels of the node's objects.
func (c *capacityPublisher) labels() map[string]string {
	return map[string]string{labelDriver: c.cfg.DriverName, labelNode: labelValue(c.cfg.NodeName)}
}

// objectName is the name of a class's object for a node: a hash, since
// names joined with any separator a name may hold could collide (the
// object's labels and storageClassName say what it is).
func objectName(node, class string) string {
	sum := sha256.Sum256([]byte(node + "/" + class))
	return "memfs-" + hex.EncodeToString(sum[:20])
}

// labelValue is s if it fits in a label value, else a hash of it.
func labelValue(s string) string {
	if len(s) <= 63 {
		return s
	}
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:20])
}
