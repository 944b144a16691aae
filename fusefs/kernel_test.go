package fusefs

import (
	"encoding/binary"
	"testing"
)

func TestInitMinor(t *testing.T) {
	init := func(op, minor uint32, n int) []byte {
		b := make([]byte, n)
		binary.LittleEndian.PutUint32(b[4:], op)
		if n >= 48 {
			binary.LittleEndian.PutUint32(b[40:], 7)
			binary.LittleEndian.PutUint32(b[44:], minor)
		}
		return b
	}
	for _, tc := range []struct {
		in   []byte
		want uint32
	}{
		{init(opInit, 40, 104), 40},
		{init(opInit, 39, 104), 39},
		{init(opInit, 41, 48), 41},
		{init(1, 41, 104), 0}, // not an INIT
		{init(opInit, 41, 44), 0},
		{nil, 0},
	} {
		if got := initMinor(tc.in); got != tc.want {
			t.Errorf("initMinor(%d bytes) = %d, want %d", len(tc.in), got, tc.want)
		}
	}
}
