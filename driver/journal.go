package driver

import (
	"encoding/json"
	"errors"
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
// are replaced by rename, so a reader sees a whole record or none; the
// file is synced before the rename and the directory after it, so that
// not even a crash of the node's kernel leaves a torn record. A record
// that cannot be read all the same costs its volume only: load reports it
// as damaged, and the driver sets the volume aside as lost.
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
	if err := os.Mkdir(dir, 0o700); err == nil {
		if err := syncDir(j.dir); err != nil {
			return err
		}
	} else if !errors.Is(err, os.ErrExist) {
		return err
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, recordFile+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(append(data, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, recordFile)); err != nil {
		return err
	}
	return syncDir(dir)
}

// syncDir makes the entries of directory dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
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

// damagedRecord is a journal entry whose record cannot be read.
type damagedRecord struct {
	// id is the volume id: the entry's directory name.
	id string
	// err says what is wrong with the record.
	err error
}

// load reads every record. Entries without a record (a publish that died
// before writing it, so nothing was mounted) are cleaned away. An
// unreadable record is returned as damaged: the volume it describes may
// hold a mount and memory, which only its unpublish frees.
func (j journal) load(logger logr.Logger) ([]record, []damagedRecord, error) {
	entries, err := os.ReadDir(j.dir)
	if err != nil {
		return nil, nil, err
	}
	var recs []record
	var damaged []damagedRecord
	for _, e := range entries {
		id := e.Name()
		if !e.IsDir() || validVolumeID(id) != nil {
			logger.Info("Ignoring a stray file in the journal", "path", filepath.Join(j.dir, id))
			continue
		}
		data, err := os.ReadFile(filepath.Join(j.volumeDir(id), recordFile))
		if isNotExist(err) {
			logger.V(1).Info("Removing a journal entry without a record", "volumeID", id)
			if err := volume.RemoveUpper(j.upperDir(id)); err != nil {
				return nil, nil, err
			}
			if err := j.remove(id); err != nil {
				return nil, nil, fmt.Errorf("journal entry %s: %w", id, err)
			}
			continue
		}
		r, err := parseRecord(id, data, err)
		if err != nil {
			damaged = append(damaged, damagedRecord{id: id, err: err})
			continue
		}
		recs = append(recs, r)
	}
	return recs, damaged, nil
}

// parseRecord decodes the record of volume id, read as data with error
// err.
func parseRecord(id string, data []byte, err error) (record, error) {
	var r record
	if err != nil {
		return r, fmt.Errorf("journal record %s: %w", id, err)
	}
	if err := json.Unmarshal(data, &r); err != nil {
		return r, fmt.Errorf("journal record %s: %w", id, err)
	}
	if r.Version != recordVersion || r.VolumeID != id {
		return r, fmt.Errorf("journal record %s: version %d for volume %q; want version %d for volume %q",
			id, r.Version, r.VolumeID, recordVersion, id)
	}
	return r, nil
}
