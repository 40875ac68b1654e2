package fuse

import (
	"context"
	"math"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/kernels"
	"gomerge/gomerge/methods"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/safetensors"
)

// applyOps applies a tensor's ops, in order, to w: the base tensor decoded
// to float32 (rows = shape[0], the rest flattened into columns). Every sum
// runs in float32; the caller rounds once to the output dtype.
func applyOps(ctx context.Context, p *fusePlan, t *fuseTensor, w []float32) error {
	rows := 1
	if len(t.shape) > 0 {
		rows = t.shape[0]
	}
	cols := len(w) / max(1, rows)
	// DoRA's norm is that of the unmerged base weight plus the adapter's own update (PEFT's
	// _unmerged_base_weight): with other ops before it, the base weight is kept aside
	var w0 []float32
	if len(t.ops) > 1 && t.hasDoRA() {
		w0 = pool.Get(len(w))
		defer pool.Put(w0)
		copy(w0, w)
	}
	for i := range t.ops {
		if err := ctx.Err(); err != nil {
			return errs.ErrCancelled
		}
		op := &t.ops[i]
		switch op.kind {
		case opReplace:
			x, err := adapter.View(op.replace)
			if err != nil {
				return err
			}
			copy(w, x)
			if op.replace.File() != nil {
				pool.Put(x)
			}
			if w0 != nil {
				copy(w0, w)
			}
		case opBias:
			b, err := adapter.View(op.mod.Bias)
			if err != nil {
				return err
			}
			s := float32(op.weight * op.mod.Scaling)
			for j := range w {
				w[j] += s * b[j]
			}
			if op.mod.Bias.File() != nil {
				pool.Put(b)
			}
		case opLoRA:
			if err := applyLoRA(op, w, w0, rows, cols, t.dtype); err != nil {
				return err
			}
		case opExpert:
			if err := applyExpert(ctx, p, t, op, w); err != nil {
				return err
			}
		case opMerged:
			_, _, ra, rb, _, err := methods.RunModule(ctx, &p.mergeOpts, op.job, p.rank, safetensors.F32)
			if err != nil {
				return err
			}
			addLowRank(w, ra.Buf, rb.Buf, rows, cols, ra.Shape[0], 1, op.transposed, t.dtype)
			pool.Put(ra.Buf)
			pool.Put(rb.Buf)
		}
	}
	return nil
}

func (t *fuseTensor) hasDoRA() bool {
	for _, op := range t.ops {
		if op.kind == opLoRA && op.mod.Magnitude.Shape != nil {
			return true
		}
	}
	return false
}

// applyLoRA adds w s B A to w; with DoRA it then rescales each output by
// m / ||W0 + s B A|| (W0 = w0, or w itself when w0 is nil), as PEFT's
// DoRA merge does.
func applyLoRA(op *fuseOp, w, w0 []float32, rows, cols int, dt safetensors.DType) error {
	m := op.mod
	defer m.Release()
	a, b, err := m.Factors()
	if err != nil {
		return err
	}
	s := float32(op.weight * m.Scaling)
	addLowRank(w, a, b, rows, cols, m.Rank, s, op.transposed, dt)
	if m.Magnitude.Shape == nil {
		return nil
	}
	mag, err := adapter.View(m.Magnitude)
	if err != nil {
		return err
	}
	if m.Magnitude.File() != nil {
		defer pool.Put(mag)
	}
	normOf := w
	if w0 != nil {
		tmp := pool.Get(len(w0))
		defer pool.Put(tmp)
		copy(tmp, w0)
		addLowRank(tmp, a, b, rows, cols, m.Rank, s, op.transposed, safetensors.F32)
		normOf = tmp
	}
	scaleByNorm(w, normOf, mag, rows, cols, op.transposed)
	return nil
}

// addLowRank adds s B A to w (rows x cols, row-major) in the base tensor's
// layout. A is r x in and B is out x r, as PEFT stores them: normally w is
// out x in and row i gains sum_k s B[i,k] A[k,:]; transposed (GPT-2's
// Conv1D with fan_in_fan_out, and embeddings, whose update is (B A)^T) w is
// in x out and row i gains sum_k A[k,i] s B[:,k]. Each row is summed in
// float64 (products of float32 values are exact there) and rounded once to
// float32: where W and the update nearly cancel, a float32 sum would be off
// by many units of the result's last place in bf16. For an output of
// dtype dt (BF16, F16) the float32 value is kept off dt's rounding
// midpoints (toFloat32For), so that its final rounding to dt is the one
// rounding of the exact sum. The rows run on all cores, through
// kernels.LowRankRows (the vector kernels of the CPU, same bits on every one).
func addLowRank(w, a, b []float32, rows, cols, r int, s float32, transposed bool, dt safetensors.DType) {
	coef, vecs := lowRankTerms(a, b, rows, cols, r, s, transposed)
	addTerms(w, coef, vecs, rows, cols, r, roundingFor(dt))
}

// lowRankTerms returns s B A (of addLowRank) as terms of the rows of w,
// in float64: w's row i gains sum_k coef[i*r+k] vecs[k*cols:(k+1)*cols].
func lowRankTerms(a, b []float32, rows, cols, r int, s float32, transposed bool) (coef, vecs []float64) {
	// the row vectors (A's rows, or s B^T's rows: r x cols) and the coefficients, in float64
	vecs = make([]float64, r*cols)
	coef = make([]float64, rows*r) // coef[i*r+k] multiplies vecs row k for output row i
	if !transposed {
		for i, v := range a[:r*cols] {
			vecs[i] = float64(v)
		}
		for i, v := range b[:rows*r] {
			coef[i] = float64(s) * float64(v)
		}
	} else {
		for j := 0; j < cols; j++ {
			for k := 0; k < r; k++ {
				vecs[k*cols+j] = float64(s) * float64(b[j*r+k])
			}
		}
		for k := 0; k < r; k++ {
			for i := 0; i < rows; i++ {
				coef[i*r+k] = float64(a[k*rows+i])
			}
		}
	}
	return coef, vecs
}

// addTerms adds the terms (lowRankTerms) to the rows of w (rows x cols),
// each row summed in float64 and rounded once (to float32, kept off the
// midpoints of the rounding to), on all cores.
func addTerms(w []float32, coef, vecs []float64, rows, cols, r int, to kernels.Rounding) {
	parallel.For(rows, max(1, (1<<16)/max(1, cols*r)), func(lo, hi int) {
		kernels.LowRankRows(w[lo*cols:hi*cols], coef[lo*r:hi*r], vecs, hi-lo, cols, r, to)
	})
}

// roundingFor is the rounding that follows a float32 result of dtype dt.
func roundingFor(dt safetensors.DType) kernels.Rounding {
	switch dt {
	case safetensors.BF16:
		return kernels.RoundBF16
	case safetensors.F16:
		return kernels.RoundF16
	}
	return kernels.RoundF32
}

// toFloat32For rounds v to float32 such that rounding the result to dt
// (to nearest, ties to even) gives v rounded to dt directly
// (kernels.ToFloat32For).
func toFloat32For(v float64, dt safetensors.DType) float32 {
	return kernels.ToFloat32For(v, roundingFor(dt))
}

// scaleByNorm multiplies each output of w by mag / ||output of normOf||:
// the outputs are the rows (out x in), or the columns when transposed (PEFT
// takes the norm of the weight in Linear layout, over the inputs). Norms
// are summed in float64.
func scaleByNorm(w, normOf, mag []float32, rows, cols int, transposed bool) {
	if !transposed {
		parallel.For(rows, max(1, (1<<16)/max(1, cols)), func(lo, hi int) {
			for i := lo; i < hi; i++ {
				f := mag[i] / float32(norm2(normOf[i*cols:(i+1)*cols]))
				row := w[i*cols : (i+1)*cols]
				for j := range row {
					row[j] *= f
				}
			}
		})
		return
	}
	sums := make([]float64, cols)
	for i := 0; i < rows; i++ {
		row := normOf[i*cols : (i+1)*cols]
		for j, v := range row {
			sums[j] += float64(v) * float64(v)
		}
	}
	f := make([]float32, cols)
	for j := range f {
		f[j] = mag[j] / float32(math.Sqrt(sums[j]))
	}
	for i := 0; i < rows; i++ {
		row := w[i*cols : (i+1)*cols]
		for j := range row {
			row[j] *= f[j]
		}
	}
}

func norm2(x []float32) float64 {
	s := 0.0
	for _, v := range x {
		s += float64(v) * float64(v)
	}
	return math.Sqrt(s)
}

// encodeOutput rounds w once to dtype d (round to nearest even), as bytes.
func encodeOutput(d safetensors.DType, w []float32) []byte {
	if d == safetensors.F32 {
		return safetensors.Float32AsBytes(w)
	}
	return safetensors.Encode(d, w)
}
