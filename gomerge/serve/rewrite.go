package serve

import (
	"context"
	"math"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/linalg"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/safetensors"
)

// moduleOut is one module's rewritten factors, encoded.
type moduleOut struct {
	a, b         safetensors.OutTensor
	aData, bData []byte
	padded       bool
	trunc        *Truncation
}

// rewriteAll rewrites every module to rank on the workers, in a.Order.
func rewriteAll(ctx context.Context, a *adapter.Adapter, rank int, dt safetensors.DType, workers int, progress *parallel.Progress, res *Result) ([]moduleOut, error) {
	if progress != nil {
		progress.Total.Store(int64(len(a.Order)))
	}
	outs := make([]moduleOut, len(a.Order))
	err := parallel.RunJobs(ctx, len(a.Order), workers, progress, func(_, i int) (err error) {
		m := a.Modules[a.Order[i]]
		defer func() {
			if p := recover(); p != nil {
				err = errs.New(errs.KindInternal, "module %s: internal error: %v", m.Name, p)
			}
		}()
		outs[i], err = rewrite(m, rank, dt)
		return err
	})
	if err != nil {
		return nil, err
	}
	for i, o := range outs {
		if o.padded {
			res.Padded++
		}
		if o.trunc != nil {
			res.Truncated[a.Order[i]] = *o.trunc
		}
	}
	return outs, nil
}

// rewrite gives module m the rank rank with its scale in B: B' = s B and
// A padded with zero rows (B' with zero columns) up to rank, or, for a
// module of a higher rank, the rank-truncated SVD of s B A (all singular
// values in B', as PEFT's SVD merges write them).
func rewrite(m *adapter.Module, rank int, dt safetensors.DType) (moduleOut, error) {
	fa, fb, err := m.Factors()
	if err != nil {
		return moduleOut{}, err
	}
	defer m.Release()
	r, in, out := m.Rank, m.In(), m.Out()
	var o moduleOut
	na, nb := make([]float32, rank*in), make([]float32, out*rank)
	if r <= rank {
		copy(na, fa[:r*in]) // rows r..rank-1 stay zero
		s := float32(m.Scaling)
		for i := range out {
			for j := range r {
				nb[i*rank+j] = s * fb[i*r+j]
			}
		}
		o.padded = r < rank
	} else {
		b64 := make([]float64, out*r)
		for i, v := range fb[:out*r] {
			b64[i] = m.Scaling * float64(v)
		}
		a64 := make([]float64, r*in)
		for i, v := range fa[:r*in] {
			a64[i] = float64(v)
		}
		bk, ak, sv := linalg.LowRankSVD(b64, a64, out, r, in, rank)
		for i, v := range bk {
			nb[i] = float32(v)
		}
		for i, v := range ak {
			na[i] = float32(v)
		}
		o.trunc = truncation(sv, r, rank)
	}
	aKey, bKey := m.Keys()
	aShape := append([]int{rank}, m.RawA.Shape[1:]...)
	bShape := append([]int{out, rank}, m.RawB.Shape[2:]...)
	o.a = safetensors.OutTensor{Name: aKey, DType: dt, Shape: aShape}
	o.b = safetensors.OutTensor{Name: bKey, DType: dt, Shape: bShape}
	o.aData = safetensors.Encode(dt, na)
	o.bData = safetensors.Encode(dt, nb)
	return o, nil
}

// truncation reports the singular values past rank of an update of rank r.
func truncation(sv []float64, r, rank int) *Truncation {
	t := &Truncation{From: r, To: rank, Tail: []float64{}}
	total, rest := 0.0, 0.0
	for i, v := range sv {
		total += v * v
		if i >= rank {
			rest += v * v
			t.Tail = append(t.Tail, v)
		}
	}
	t.Error = math.Sqrt(rest)
	if total > 0 {
		t.RelativeError = math.Sqrt(rest / total)
	}
	return t
}
