package fusefs

import "testing"

// TestStaleAttrsBounded: the set forgets what a fresh reply answered, and
// holds at most maxStaleAttrs inodes however many are added.
func TestStaleAttrsBounded(t *testing.T) {
	var s staleAttrs
	if s.has(1) {
		t.Fatal("an empty set has inode 1")
	}
	s.add(1)
	s.add(1)
	if !s.has(1) || s.n.Load() != 1 {
		t.Fatalf("after adding 1 twice: has %v, %d inodes", s.has(1), s.n.Load())
	}
	s.fresh(1)
	if s.has(1) || s.n.Load() != 0 {
		t.Fatalf("after a fresh reply: has %v, %d inodes", s.has(1), s.n.Load())
	}
	for ino := uint64(1); ino <= maxStaleAttrs+100; ino++ {
		s.add(ino)
	}
	if n := s.n.Load(); n != maxStaleAttrs || len(s.m) != maxStaleAttrs {
		t.Fatalf("after %d adds: %d inodes (map %d), want %d", maxStaleAttrs+100, n, len(s.m), maxStaleAttrs)
	}
	if !s.has(maxStaleAttrs + 100) {
		t.Error("the last inode added was dropped")
	}
}
