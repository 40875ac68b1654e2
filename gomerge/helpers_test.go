package gomerge

import "gomerge/gomerge/internal/testutil"

// The shared test helpers (package internal/testutil), under the names the tests use.
type (
	testModule = testutil.Module
)

var (
	randTensor       = testutil.RandTensor
	writeTestAdapter = testutil.WriteAdapter
	product          = testutil.Product
)
