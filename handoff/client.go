package handoff

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// opTimeout bounds one request to the holder, which answers at once: the
// only wait is for a running fallback to end, about 100 ms.
const opTimeout = 30 * time.Second

// A Client talks to a Holder. It is safe for concurrent use; requests are
// served one at a time. A plugin keeps one open while it lives (see the
// package doc).
type Client struct {
	mu sync.Mutex
	// c is the connection. Protected by mu: one request and its answer at
	// a time.
	c *Conn
	// broken, once set, is why the connection is out of step with the
	// holder (a request failed midway); every request then fails with it.
	// Protected by mu.
	broken error
}

// Dial connects to the holder listening on sockPath.
func Dial(sockPath string) (*Client, error) {
	c, err := DialConn(sockPath)
	if err != nil {
		return nil, err
	}
	return &Client{c: c}, nil
}

// Close closes the connection. The holder keeps the bundles.
func (cl *Client) Close() error { return cl.c.Close() }

// Put has the holder keep b, replacing the bundle of the same ID. When it
// returns nil the holder has its own descriptors: b's files may be closed.
func (cl *Client) Put(b Bundle) error {
	if b.ID == "" {
		return fmt.Errorf("%w: bundle without an id", ErrBadMessage)
	}
	if err := checkMsg(opPut, b.ID, len(b.Meta), len(b.Files)); err != nil {
		return err
	}
	return cl.do(Msg{Op: opPut, ID: b.ID, Data: b.Meta, Files: b.Files}, func() error {
		_, err := cl.c.Expect(OpAck)
		return err
	})
}

// Del has the holder close and forget the bundle id; a missing one is no
// error.
func (cl *Client) Del(id string) error {
	if id == "" {
		return fmt.Errorf("%w: no id", ErrBadMessage)
	}
	if err := checkMsg(opDel, id, 0, 0); err != nil {
		return err
	}
	return cl.do(Msg{Op: opDel, ID: id}, func() error {
		_, err := cl.c.Expect(OpAck)
		return err
	})
}

// List returns every bundle the holder keeps, sorted by ID, with new
// descriptors the caller owns.
func (cl *Client) List() ([]Bundle, error) {
	var bs []Bundle
	err := cl.do(Msg{Op: opList}, func() error {
		var err error
		bs, err = cl.c.RecvBundles()
		return err
	})
	return bs, err
}

// do sends one request and receives its answer with recv, under the lock
// and a deadline. A send that fails sent nothing (a message is one
// datagram), but an error while receiving, other than the holder's
// refusal, leaves the connection out of step for good.
func (cl *Client) do(req Msg, recv func() error) error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.broken != nil {
		return cl.broken
	}
	if err := cl.c.SetDeadline(time.Now().Add(opTimeout)); err != nil {
		return fmt.Errorf("handoff: %w", err)
	}
	if err := cl.c.Send(req); err != nil {
		return err
	}
	err := recv()
	var pe *PeerError
	if err != nil && !errors.As(err, &pe) {
		cl.broken = fmt.Errorf("handoff: connection to the holder unusable after: %w", err)
	}
	return err
}
