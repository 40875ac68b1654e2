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

// moduleOut is what rewriting one module did.
type moduleOut struct {
	padded bool
	trunc  *Truncation
}

// outTensors lists the profile's tensors: every module's A and B at rank.
func outTensors(a *adapter.Adapter, rank int, dt safetensors.DType) []safetensors.OutTensor {
	out := make([]safetensors.OutTensor, 0, 2*len(a.Order))
	for _, name := range a.Order {
		m := a.Modules[name]
		aKey, bKey := m.Keys()
		out = append(out,
			safetensors.OutTensor{Name: aKey, DType: dt, Shape: append([]int{rank}, m.RawA.Shape[1:]...)},
			safetensors.OutTensor{Name: bKey, DType: dt, Shape: append([]int{m.Out(), rank}, m.RawB.Shape[2:]...)})
	}
	return out
}

// rewriteAll rewrites every module to rank on the workers, each writing
// its factors to w, and records what was padded and truncated in res.
func rewriteAll(ctx context.Context, a *adapter.Adapter, rank int, dt safetensors.DType, workers int, progress *parallel.Progress, res *Result, w *safetensors.Writer) error {
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
		na, nb, out, err := rewrite(m, rank)
		if err != nil {
			return err
		}
		outs[i] = out
		aKey, bKey := m.Keys()
		return w.WritePair(aKey, safetensors.Encode(dt, na), bKey, safetensors.Encode(dt, nb))
	})
	if err != nil {
		return err
	}
	for i, o := range outs {
		if o.padded {
			res.Padded++
		}
		if o.trunc != nil {
			res.Truncated[a.Order[i]] = *o.trunc
		}
	}
	return nil
}

// rewrite gives module m the rank rank with its scale in B, as float32
// A (rank x In) and B (Out x rank): B' = s B and A padded with zero rows
// (B' with zero columns) up to rank, or, for a module of a higher rank,
// the rank-truncated SVD of s B A (all singular values in B', as PEFT's
// SVD merges write them), computed from the factors in float64.
func rewrite(m *adapter.Module, rank int) (na, nb []float32, o moduleOut, err error) {
	fa, fb, err := m.Factors()
	if err != nil {
		return nil, nil, o, err
	}
	defer m.Release()
	r, in, out := m.Rank, m.In(), m.Out()
	na, nb = make([]float32, rank*in), make([]float32, out*rank)
	if r <= rank {
		copy(na, fa[:r*in]) // rows r..rank-1 stay zero
		for i := range out {
			for j := range r {
				nb[i*rank+j] = float32(m.Scaling * float64(fb[i*r+j])) // one rounding of the exact product
			}
		}
		o.padded = r < rank
		return na, nb, o, nil
	}
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
	return na, nb, o, nil
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
