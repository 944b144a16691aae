// Package provisioner makes the PersistentVolumes of csi-memfs
// StorageClasses on the node that will hold them, and tells the scheduler
// how much memory each node has left for them.
//
// Every node's plugin runs one (csi-memfs serve --provisioner), for its
// own node only: a claim of a csi-memfs StorageClass is provisioned by the
// plugin of the node the scheduler selected for its pod
// (volumeBindingMode: WaitForFirstConsumer sets the claim's
// volume.kubernetes.io/selected-node), since the volume's memory is there.
// This is the distributed provisioning of the CSI external-provisioner
// (its --node-deployment), done in process: the plugin's controller
// service (a small interface, Controller) is called directly, not over the
// CSI socket.
//
// The claims are driven by sig-storage-lib-external-provisioner's
// ProvisionController, as the external-provisioner does: it brings the
// claim and volume informers, events, retries, finalizers and the
// rescheduling of a claim whose node has no room; this package adds the
// PersistentVolume of a CreateVolume answer (Provision) and the node
// filters (ShouldProvision, ShouldDelete). Leader election is off: one
// process per node, each answering for its node only.
//
// The capacity publisher (capacity.go) keeps one CSIStorageCapacity per
// csi-memfs StorageClass for the node's topology segment, with the
// memory left in the node's budget (GetCapacity), so the scheduler only
// selects nodes that can hold a pod's volumes (CSIDriver storageCapacity:
// true).
package provisioner

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
	"sigs.k8s.io/sig-storage-lib-external-provisioner/v11/controller"
)

// annSelectedNode is the claim annotation the scheduler sets to the node
// it selected for the claim's first pod.
const annSelectedNode = "volume.kubernetes.io/selected-node"

// Controller is the part of the plugin's CSI controller service the
// provisioner calls (driver.Driver implements it).
type Controller interface {
	CreateVolume(context.Context, *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error)
	DeleteVolume(context.Context, *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error)
	GetCapacity(context.Context, *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error)
}

// Config configures Run.
type Config struct {
	// Client is the API client. Required.
	Client kubernetes.Interface
	// Controller answers CreateVolume and GetCapacity. Required.
	Controller Controller
	// DriverName is the CSI driver name, the StorageClasses' provisioner.
	DriverName string
	// NodeName is this node: only claims selected for it are provisioned.
	NodeName string
	// TopologyKey is the key of the node's topology segment, whose value
	// is NodeName.
	TopologyKey string
	// Namespace holds the CSIStorageCapacity objects (the plugin's).
	Namespace string
	// Owner owns the CSIStorageCapacity objects (the plugin's pod), so
	// they go with it; nil for none.
	Owner *metav1.OwnerReference
	// CapacityInterval is how often the node's capacity is read and, if it
	// changed, written (at most once per interval). Default 5 s.
	CapacityInterval time.Duration
}

// Run provisions the claims selected for the node and publishes its
// capacity until ctx is done.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Client == nil || cfg.Controller == nil || cfg.NodeName == "" || cfg.Namespace == "" {
		return errors.New("provisioner: client, controller, node name and namespace are required (NODE_NAME, POD_NAMESPACE)")
	}
	if cfg.CapacityInterval == 0 {
		cfg.CapacityInterval = 5 * time.Second
	}
	logger := klog.FromContext(ctx).WithName("provisioner")
	ctx = klog.NewContext(ctx, logger)
	p := &provisioner{cfg: cfg}
	pc := controller.NewProvisionController(ctx, cfg.Client, cfg.DriverName, p,
		controller.LeaderElection(false),
		controller.FailedProvisionThreshold(0), // retry until the claim is gone
	)
	// The capacity publisher reads the classes from a cache: one watch,
	// not a list per interval and node.
	factory := informers.NewSharedInformerFactory(cfg.Client, 0)
	classes := factory.Storage().V1().StorageClasses()
	lister := classes.Lister()
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	go func() {
		if !cache.WaitForCacheSync(ctx.Done(), classes.Informer().HasSynced) {
			return
		}
		newCapacityPublisher(cfg, lister).run(ctx)
	}()
	logger.Info("Provisioning claims of the node", "driver", cfg.DriverName, "node", cfg.NodeName)
	pc.Run(ctx)
	return nil
}

// provisioner is the library's Provisioner (and Qualifier and
// DeletionGuard) for one node.
type provisioner struct {
	// cfg is the configuration. Immutable.
	cfg Config
}

var (
	_ controller.Provisioner   = (*provisioner)(nil)
	_ controller.Qualifier     = (*provisioner)(nil)
	_ controller.DeletionGuard = (*provisioner)(nil)
)

// ShouldProvision takes a claim selected for this node only.
func (p *provisioner) ShouldProvision(_ context.Context, c *v1.PersistentVolumeClaim) bool {
	return c.Annotations[annSelectedNode] == p.cfg.NodeName
}

// ShouldDelete takes a volume of this node only: every node's provisioner
// sees every volume.
func (p *provisioner) ShouldDelete(_ context.Context, pv *v1.PersistentVolume) bool {
	return nodeOf(pv, p.cfg.TopologyKey) == p.cfg.NodeName
}

// Provision asks the controller service for the claim's volume and
// returns its PersistentVolume, bound to the node. A node without room
// (ResourceExhausted) has the claim rescheduled.
func (p *provisioner) Provision(ctx context.Context, o controller.ProvisionOptions) (*v1.PersistentVolume, controller.ProvisioningState, error) {
	if o.SelectedNode == nil || o.SelectedNode.Name != p.cfg.NodeName {
		return nil, controller.ProvisioningFinished, &controller.IgnoredError{Reason: "the claim is not selected for this node"}
	}
	req, err := p.createRequest(o)
	if err != nil {
		return nil, controller.ProvisioningFinished, err
	}
	resp, err := p.cfg.Controller.CreateVolume(ctx, req)
	switch status.Code(err) {
	case codes.OK:
	case codes.ResourceExhausted:
		return nil, controller.ProvisioningReschedule, err
	default:
		return nil, controller.ProvisioningFinished, err
	}
	v := resp.GetVolume()
	reclaim := v1.PersistentVolumeReclaimDelete
	if o.StorageClass.ReclaimPolicy != nil {
		reclaim = *o.StorageClass.ReclaimPolicy
	}
	pv := &v1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{
			Name:        o.PVName,
			Annotations: map[string]string{"pv.kubernetes.io/provisioned-by": p.cfg.DriverName},
		},
		Spec: v1.PersistentVolumeSpec{
			PersistentVolumeReclaimPolicy: reclaim,
			AccessModes:                   o.PVC.Spec.AccessModes,
			MountOptions:                  o.StorageClass.MountOptions,
			VolumeMode:                    o.PVC.Spec.VolumeMode,
			Capacity:                      v1.ResourceList{v1.ResourceStorage: *resource.NewQuantity(v.GetCapacityBytes(), resource.BinarySI)},
			PersistentVolumeSource: v1.PersistentVolumeSource{CSI: &v1.CSIPersistentVolumeSource{
				Driver:           p.cfg.DriverName,
				VolumeHandle:     v.GetVolumeId(),
				VolumeAttributes: v.GetVolumeContext(),
			}},
			NodeAffinity: &v1.VolumeNodeAffinity{Required: &v1.NodeSelector{NodeSelectorTerms: []v1.NodeSelectorTerm{{
				MatchExpressions: []v1.NodeSelectorRequirement{{
					Key: p.cfg.TopologyKey, Operator: v1.NodeSelectorOpIn, Values: []string{p.cfg.NodeName}}},
			}}}},
		},
	}
	klog.FromContext(ctx).V(2).Info("Provisioned volume", "claim", klog.KObj(o.PVC), "pv", o.PVName,
		"volumeID", v.GetVolumeId(), "size", v.GetCapacityBytes())
	return pv, controller.ProvisioningFinished, nil
}

// createRequest is the CreateVolume request of a claim.
func (p *provisioner) createRequest(o controller.ProvisionOptions) (*csi.CreateVolumeRequest, error) {
	if o.PVC.Spec.DataSource != nil || o.PVC.Spec.DataSourceRef != nil {
		return nil, errors.New("spec.dataSource: csi-memfs volumes cannot be cloned or restored; use the StorageClass's image parameter")
	}
	var caps []*csi.VolumeCapability
	for _, m := range o.PVC.Spec.AccessModes {
		var mode csi.VolumeCapability_AccessMode_Mode
		switch m {
		case v1.ReadWriteOnce:
			mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
		case v1.ReadWriteOncePod:
			mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
		default:
			return nil, fmt.Errorf("spec.accessModes: %s is not supported; want ReadWriteOnce or ReadWriteOncePod "+
				"(a csi-memfs volume is one node's memory)", m)
		}
		caps = append(caps, &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
		})
	}
	r := &csi.CreateVolumeRequest{
		Name:               o.PVName,
		VolumeCapabilities: caps,
		Parameters:         o.StorageClass.Parameters,
		CapacityRange:      &csi.CapacityRange{},
		AccessibilityRequirements: &csi.TopologyRequirement{
			Requisite: []*csi.Topology{{Segments: map[string]string{p.cfg.TopologyKey: p.cfg.NodeName}}},
		},
	}
	if q, ok := o.PVC.Spec.Resources.Requests[v1.ResourceStorage]; ok {
		r.CapacityRange.RequiredBytes = q.Value()
	}
	if q, ok := o.PVC.Spec.Resources.Limits[v1.ResourceStorage]; ok {
		r.CapacityRange.LimitBytes = q.Value()
	}
	return r, nil
}

// Delete asks the controller service to delete the volume (its memory is
// already released: it was freed when the volume was unpublished).
func (p *provisioner) Delete(ctx context.Context, pv *v1.PersistentVolume) error {
	if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != p.cfg.DriverName {
		return &controller.IgnoredError{Reason: "not a volume of this driver"}
	}
	if nodeOf(pv, p.cfg.TopologyKey) != p.cfg.NodeName {
		return &controller.IgnoredError{Reason: "a volume of another node"}
	}
	_, err := p.cfg.Controller.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: pv.Spec.CSI.VolumeHandle})
	return err
}

// nodeOf returns the node a volume's node affinity names by key, or "".
func nodeOf(pv *v1.PersistentVolume, key string) string {
	if pv.Spec.NodeAffinity == nil || pv.Spec.NodeAffinity.Required == nil {
		return ""
	}
	for _, t := range pv.Spec.NodeAffinity.Required.NodeSelectorTerms {
		for _, e := range t.MatchExpressions {
			if e.Key == key && e.Operator == v1.NodeSelectorOpIn && len(e.Values) == 1 {
				return e.Values[0]
			}
		}
	}
	return ""
}
