package provisioner

import (
	"context"
	"maps"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
	v1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/sig-storage-lib-external-provisioner/v11/controller"
)

const topologyKey = "topology.memfs.csi.dev/node"

// fakeController answers like the driver: CreateVolume with the request's
// size, ResourceExhausted above free; GetCapacity with free.
type fakeController struct {
	free    int64
	created []*csi.CreateVolumeRequest
}

func (f *fakeController) CreateVolume(_ context.Context, r *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	f.created = append(f.created, r)
	if r.GetCapacityRange().GetRequiredBytes() > f.free {
		return nil, status.Error(codes.ResourceExhausted, "no room")
	}
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{VolumeId: "memfs-1", CapacityBytes: r.GetCapacityRange().GetRequiredBytes(),
		VolumeContext: map[string]string{"size": "1", "memfs.csi.dev/provisioned": "true"}}}, nil
}

func (f *fakeController) DeleteVolume(context.Context, *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	return &csi.DeleteVolumeResponse{}, nil
}

func (f *fakeController) GetCapacity(context.Context, *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	return &csi.GetCapacityResponse{AvailableCapacity: f.free, MaximumVolumeSize: wrapperspb.Int64(f.free)}, nil
}

func claim(node string, size string, modes ...v1.PersistentVolumeAccessMode) *v1.PersistentVolumeClaim {
	return &v1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "c", Namespace: "ns", Annotations: map[string]string{annSelectedNode: node}},
		Spec: v1.PersistentVolumeClaimSpec{AccessModes: modes, Resources: v1.VolumeResourceRequirements{
			Requests: v1.ResourceList{v1.ResourceStorage: resource.MustParse(size)}}},
	}
}

func TestProvision(t *testing.T) {
	ctrl := &fakeController{free: 32 << 20}
	p := &provisioner{cfg: Config{Controller: ctrl, DriverName: "memfs.csi.dev", NodeName: "n1", TopologyKey: topologyKey}}
	ctx := context.Background()
	sc := &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "memory"}, Provisioner: "memfs.csi.dev",
		Parameters: map[string]string{"noswap": "true"}}
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}}

	if p.ShouldProvision(ctx, claim("n2", "1Mi")) || !p.ShouldProvision(ctx, claim("n1", "1Mi")) {
		t.Errorf("ShouldProvision takes claims of other nodes, or not of its own")
	}
	pv, state, err := p.Provision(ctx, controller.ProvisionOptions{StorageClass: sc, PVName: "pvc-1",
		PVC: claim("n1", "16Mi", v1.ReadWriteOnce), SelectedNode: node})
	if err != nil || state != controller.ProvisioningFinished {
		t.Fatalf("Provision = %v, %v", state, err)
	}
	r := ctrl.created[0]
	if r.GetName() != "pvc-1" || r.GetCapacityRange().GetRequiredBytes() != 16<<20 || !maps.Equal(r.GetParameters(), sc.Parameters) ||
		r.GetVolumeCapabilities()[0].GetAccessMode().GetMode() != csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER {
		t.Errorf("CreateVolume request = %v", r)
	}
	if pv.Spec.CSI.VolumeHandle != "memfs-1" || pv.Spec.CSI.VolumeAttributes["memfs.csi.dev/provisioned"] != "true" ||
		nodeOf(pv, topologyKey) != "n1" || pv.Spec.PersistentVolumeReclaimPolicy != v1.PersistentVolumeReclaimDelete ||
		pv.Spec.Capacity.Storage().Value() != 16<<20 {
		t.Errorf("PV = %+v", pv.Spec)
	}
	if !p.ShouldDelete(ctx, pv) {
		t.Errorf("ShouldDelete of the node's own volume = false")
	}
	if _, state, err := p.Provision(ctx, controller.ProvisionOptions{StorageClass: sc, PVName: "pvc-2",
		PVC: claim("n1", "64Mi", v1.ReadWriteOnce), SelectedNode: node}); err == nil || state != controller.ProvisioningReschedule {
		t.Errorf("Provision beyond the budget = %v, %v; want a reschedule", state, err)
	}
	if _, _, err := p.Provision(ctx, controller.ProvisionOptions{StorageClass: sc, PVName: "pvc-3",
		PVC: claim("n1", "1Mi", v1.ReadWriteMany), SelectedNode: node}); err == nil {
		t.Errorf("Provision of a ReadWriteMany claim succeeded")
	}
}

func TestCapacityPublisher(t *testing.T) {
	ctx := context.Background()
	client := fake.NewClientset(
		&storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "memory"}, Provisioner: "memfs.csi.dev"},
		&storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "other"}, Provisioner: "other.csi.dev"},
	)
	factory := informers.NewSharedInformerFactory(client, 0)
	lister := factory.Storage().V1().StorageClasses().Lister()
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	// classes waits until the informer lists n classes.
	classes := func(n int, what string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if l, _ := lister.List(labels.Everything()); len(l) == n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("the informer did not see %s", what)
			}
		}
	}
	// The fake clientset's watch does not replay what happened before it
	// started (its watches have no resource versions): a class made and
	// seen proves the informer's watch is running before the deletion
	// below depends on it.
	if _, err := client.StorageV1().StorageClasses().Create(ctx, &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "probe"}, Provisioner: "other.csi.dev"}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	classes(3, "a class created")
	ctrl := &fakeController{free: 32 << 20}
	owner := &metav1.OwnerReference{APIVersion: "v1", Kind: "Pod", Name: "csi-memfs-x", UID: "u"}
	c := newCapacityPublisher(Config{Client: client, Controller: ctrl, DriverName: "memfs.csi.dev", NodeName: "n1",
		TopologyKey: topologyKey, Namespace: "kube-system", Owner: owner}, lister)

	get := func() []storagev1.CSIStorageCapacity {
		t.Helper()
		if err := c.sync(ctx); err != nil {
			t.Fatalf("sync: %v", err)
		}
		l, err := client.StorageV1().CSIStorageCapacities("kube-system").List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return l.Items
	}
	objs := get()
	if len(objs) != 1 || objs[0].StorageClassName != "memory" || objs[0].Capacity.Value() != 32<<20 ||
		objs[0].NodeTopology.MatchLabels[topologyKey] != "n1" || objs[0].OwnerReferences[0].Name != "csi-memfs-x" {
		t.Fatalf("objects = %+v; want one for class memory with 32Mi on n1", objs)
	}
	ctrl.free = 8 << 20
	if objs := get(); objs[0].Capacity.Value() != 8<<20 || objs[0].MaximumVolumeSize.Value() != 8<<20 {
		t.Errorf("capacity after a publish = %v, want 8Mi", objs[0].Capacity)
	}
	n := len(client.Actions())
	get()
	for _, a := range client.Actions()[n:] {
		if a.GetVerb() != "list" {
			t.Errorf("an unchanged capacity was written: %v", a)
		}
	}
	if err := client.StorageV1().StorageClasses().Delete(ctx, "memory", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	classes(2, "a class deleted")
	if objs := get(); len(objs) != 0 {
		t.Errorf("objects of a deleted class = %+v, want none", objs)
	}
}
