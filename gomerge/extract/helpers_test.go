package extract

import "gomerge/gomerge/internal/testutil"

// The shared test helpers (package internal/testutil), under the names the tests use.
type (
	Tensor = testutil.Tensor
)

var (
	randTensor       = testutil.RandTensor
	product          = testutil.Product
	orthonormal      = testutil.Orthonormal
	WriteSafetensors = testutil.WriteSafetensors
)
