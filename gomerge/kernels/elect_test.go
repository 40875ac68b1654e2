package kernels

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestElectAndDisjointMerge(t *testing.T) {
	tensors := [][]float32{{1, -2, 0, 3, 0}, {2, 1, 0, -3, -1}, {-4, 1, 0, 0, 0}}
	// total: sums -1, 0, 0, 0, -1 -> -1, +1, +1, +1, -1
	assert.Equal(t, []float32{-1, 1, 1, 1, -1}, ElectSigns(tensors, SignTotal))
	// frequency: sign sums 1, 1, 0, 0, -1
	assert.Equal(t, []float32{1, 1, 1, 1, -1}, ElectSigns(tensors, SignFrequency))
	w := []float32{1, 2, 3}
	got := DisjointMerge(tensors, w, ElectSigns(tensors, SignTotal))
	// element 0: only -4 agrees: -12/1; element 1: 1*2 and 1*3 agree: 5/2; element 2: no one agrees: 0;
	// element 3: 3 agrees (zero never agrees): 3/1; element 4: -1*2: -2/1
	assert.Equal(t, []float32{-12, 2.5, 0, 3, -2}, got)
}
