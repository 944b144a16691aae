package memfs

// Usage is what a volume's memory layer uses and may use, as the tmpfs
// instance counts it.
type Usage struct {
	BytesUsed, BytesLimit   uint64
	InodesUsed, InodesLimit uint64
}

// Usage reports the instance's usage. The numbers are those df shows.
func (l *Layer) Usage() (Usage, error) {
	st, err := l.StatFS()
	if err != nil {
		return Usage{}, err
	}
	bs := uint64(st.Bsize)
	return Usage{
		BytesUsed:   (st.Blocks - st.Bfree) * bs,
		BytesLimit:  st.Blocks * bs,
		InodesUsed:  st.Files - st.Ffree,
		InodesLimit: st.Files,
	}, nil
}
