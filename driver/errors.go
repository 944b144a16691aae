package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// codedError is an error with the gRPC code its RPC answers with.
type codedError struct {
	code codes.Code
	msg  string
}

func (e *codedError) Error() string { return e.msg }

// errorf returns an error that toStatus answers with code.
func errorf(code codes.Code, format string, args ...any) error {
	return &codedError{code: code, msg: fmt.Sprintf(format, args...)}
}

// toStatus converts a handler's error to a gRPC status, once: the code of
// the coded error inside, DeadlineExceeded or Canceled for a context's
// error, else Internal. The message is the whole wrapped error.
func toStatus(err error) error {
	var ce *codedError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ce):
		return status.Error(ce.code, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

// isNotExist reports an error meaning a path does not exist.
func isNotExist(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOENT)
}
