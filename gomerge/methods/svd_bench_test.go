package methods

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
)

// BenchmarkSVDModules is bench S2's ties_svd (three rank-16 adapters on one
// 4096 x 4096 module), S3's svd (eight rank-64 adapters on a Llama-7B
// attention and MLP module) and S1's svd (three rank-8 adapters on
// TinyLlama's attention, grouped key/value and MLP shapes) without the disk.
func BenchmarkSVDModules(b *testing.B) {
	for _, bc := range []struct {
		name    string
		out, in int
		ranks   []int
	}{
		{"ties_svd", 4096, 4096, []int{16, 16, 16}},
		{"svd", 4096, 4096, []int{64, 64, 64, 64, 64, 64, 64, 64}},
		{"svd", 11008, 4096, []int{64, 64, 64, 64, 64, 64, 64, 64}},
		{"svd", 2048, 2048, []int{8, 8, 8}},
		{"svd", 5632, 2048, []int{8, 8, 8}},
		{"svd", 256, 2048, []int{8, 8, 8}},
	} {
		b.Run(fmt.Sprintf("%s/%dx%d", bc.name, bc.out, bc.in), func(b *testing.B) {
			srcs := spanSources(rand.New(rand.NewPCG(21, 22)), bc.out, bc.in, bc.ranks...)
			j := &ModuleJob{Name: "proj", Srcs: srcs, In: bc.in, Out: bc.out}
			o := Combine{CombinationType: bc.name}
			if bc.name != "svd" {
				density := 0.2
				o.Density = &density
			}
			require.NoError(b, o.Validate())
			m := o.Method()
			rank := bc.ranks[0]
			defer reportCPU(b)()
			for b.Loop() {
				if _, err := m.Merge(context.Background(), j, &o, rank); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
