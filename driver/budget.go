package driver

import (
	"sync/atomic"

	"google.golang.org/grpc/codes"
)

// budget is the node's memory budget and volume count. Reservations are
// made with compare-and-swap, so publishes never wait for each other here.
type budget struct {
	// limit is the byte budget; 0 means none. Immutable.
	limit int64
	// maxVolumes bounds the number of volumes; 0 means none. Immutable.
	maxVolumes int64
	// bytes is the sum of the reserved sizes. Accessed atomically.
	// Invariant: bytes <= limit when limit > 0, except after recovering
	// lost volumes, which are counted whatever the limit.
	bytes atomic.Int64
	// volumes is the number of reservations. Accessed atomically.
	volumes atomic.Int64
}

// reserve takes size bytes and one volume from the budget, or fails with
// ResourceExhausted and takes nothing.
func (b *budget) reserve(size int64) error {
	for {
		cur := b.bytes.Load()
		if b.limit > 0 && cur+size > b.limit {
			return errorf(codes.ResourceExhausted,
				"node memory budget exhausted: %s requested, %s of %s already reserved by other volumes (flag --node-memory-budget)",
				quantityString(size), quantityString(cur), quantityString(b.limit))
		}
		if b.bytes.CompareAndSwap(cur, cur+size) {
			break
		}
	}
	for {
		cur := b.volumes.Load()
		if b.maxVolumes > 0 && cur >= b.maxVolumes {
			b.bytes.Add(-size)
			return errorf(codes.ResourceExhausted,
				"node volume limit reached: %d volumes published (flag --max-volumes)", cur)
		}
		if b.volumes.CompareAndSwap(cur, cur+1) {
			return nil
		}
	}
}

// force reserves like reserve but ignores the limits: for recovered
// volumes, which hold their memory whatever the budget says.
func (b *budget) force(size int64) {
	b.bytes.Add(size)
	b.volumes.Add(1)
}

// release returns a reservation of size bytes.
func (b *budget) release(size int64) {
	b.bytes.Add(-size)
	b.volumes.Add(-1)
}

// free returns the bytes left in the budget (0 when over it), or -1 when
// there is no budget.
func (b *budget) free() int64 {
	if b.limit == 0 {
		return -1
	}
	return max(b.limit-b.bytes.Load(), 0)
}

// full says whether the volume count is at its limit.
func (b *budget) full() bool {
	return b.maxVolumes > 0 && b.volumes.Load() >= b.maxVolumes
}
