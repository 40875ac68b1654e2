package fuse

import "gomerge/gomerge/internal/testutil"

// The shared test helpers (package internal/testutil), under the names the tests use.
type (
	Tensor     = testutil.Tensor
	testModule = testutil.Module
)

var (
	randTensor       = testutil.RandTensor
	writeTestAdapter = testutil.WriteAdapter
	WriteSafetensors = testutil.WriteSafetensors
)
