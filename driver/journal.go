package driver

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/go-logr/logr"

	"github.com/csi-memfs/csi-memfs/volume"
)

// recordVersion is the version of the journal record format.
const recordVersion = 1

// record is a published volume as the journal keeps it: enough for a later
// process to unpublish it, report it, and one day adopt its data.
type record struct {
	Version     int         `json:"version"`
	VolumeID    string      `json:"volumeID"`
	Spec        publishSpec `json:"spec"`
	Pod         podInfo     `json:"pod"`
	PublishedAt time.Time   `json:"publishedAt"`
	// ImageDigest is the manifest digest of the image the volume's lower
	// layer comes from; empty for a pure memory volume. A later process
	// pins it again so that the cache keeps the image while the volume
	// exists.
	ImageDigest string `json:"imageDigest,omitempty"`
}

// journal is the on-disk list of published volumes: one directory per
// volume under dir,
//
//	<dir>/<volume id>/volume.json   the record
//	<dir>/<volume id>/upper/        the memory layer's tmpfs mount point
//
// A record is written before the memory layer is mounted and removed after
// it is unmounted, so every memory layer under dir has a record. Records
// are replaced by rename, so a reader sees a whole record or none. They are
// not fsynced: they only need to outlive the process, and a machine that
// reboots loses the mounts they describe anyway.
//
// Volume ids are checked by validVolumeID before they name a directory.
// Operations on one volume's entry are serialized by that volume's
// registry lock; the journal holds no lock of its own.
type journal struct {
	// dir is <state dir>/volumes. Immutable.
	dir string
}

const recordFile = "volume.json"

func (j journal) volumeDir(id string) string { return filepath.Join(j.dir, id) }
func (j journal) upperDir(id string) string  { return filepath.Join(j.dir, id, "upper") }

// write records r, replacing any record of the volume.
func (j journal) write(r record) error {
	dir := j.volumeDir(r.VolumeID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, recordFile+".tmp")
	if err := os.WriteFile(tmp, append(data, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, recordFile))
}

// remove deletes the volume's record and its directory. The memory layer
// must already be unmounted: nothing here removes anything but the record
// and empty directories. A missing entry is success.
func (j journal) remove(id string) error {
	dir := j.volumeDir(id)
	for _, name := range []string{recordFile, recordFile + ".tmp"} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !isNotExist(err) {
			return err
		}
	}
	if err := os.Remove(dir); err != nil && !isNotExist(err) {
		return err
	}
	return nil
}

// load reads every record. Entries without a record (a publish that died
// before writing it, so nothing was mounted) are cleaned away; an unreadable
// record is an error, since the volume it describes may hold a mount.
func (j journal) load(logger logr.Logger) ([]record, error) {
	entries, err := os.ReadDir(j.dir)
	if err != nil {
		return nil, err
	}
	var recs []record
	for _, e := range entries {
		id := e.Name()
		if !e.IsDir() {
			logger.Info("Ignoring a stray file in the journal", "path", filepath.Join(j.dir, id))
			continue
		}
		data, err := os.ReadFile(filepath.Join(j.volumeDir(id), recordFile))
		if isNotExist(err) {
			logger.V(1).Info("Removing a journal entry without a record", "volumeID", id)
			if err := volume.RemoveUpper(j.upperDir(id)); err != nil {
				return nil, err
			}
			if err := j.remove(id); err != nil {
				return nil, fmt.Errorf("journal entry %s: %w", id, err)
			}
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("journal: %w", err)
		}
		var r record
		if err := json.Unmarshal(data, &r); err != nil {
			return nil, fmt.Errorf("journal record %s: %w", id, err)
		}
		if r.Version != recordVersion || r.VolumeID != id {
			return nil, fmt.Errorf("journal record %s: version %d for volume %q; want version %d for volume %q",
				id, r.Version, r.VolumeID, recordVersion, id)
		}
		recs = append(recs, r)
	}
	return recs, nil
}
