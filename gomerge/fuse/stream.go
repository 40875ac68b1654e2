package fuse

import (
	"context"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/safetensors"
)

// streamBlock is how many values of a streamed tensor are read, fused and
// written at a time (4 MiB as float32: they stay in the caches from the
// read to the write). A variable for the tests, which stream a row at a
// time, and turn streaming off (streamTensors) to compare.
var streamBlock = 1 << 20

// streamTensors turns streaming on (fuseOne); tests turn it off to compare
// with the whole-tensor path.
var streamTensors = true

// streamed reports whether tensor t is fused a block of rows at a time
// (fuseStreamed): one LoRA without DoRA, the case of almost every adapted
// layer. Its rows are independent (each sums its own terms), so the tensor
// never needs to be in memory whole, and the reads, the arithmetic and the
// writes of the tensors in flight overlap.
func (t *fuseTensor) streamed() bool {
	return streamTensors && len(t.ops) == 1 && t.ops[0].kind == opLoRA && t.ops[0].mod.Magnitude.Shape == nil &&
		t.dtype != "" && len(t.shape) > 0 && safetensors.Numel(t.shape) > 0
}

// streamCost is the memory a worker holds while it streams tensor t: a
// block as float32, as stored and as written, and the float64 terms.
func (t *fuseTensor) streamCost() int64 {
	rows := int64(t.shape[0])
	cols := int64(safetensors.Numel(t.shape)) / max(1, rows)
	block := min(rows*cols, max(1, int64(streamBlock)/max(1, cols))*cols)
	r := int64(t.ops[0].mod.Rank)
	return block*(4+4+4) + 8*r*(rows+cols)
}

// fuseStreamed writes tensor t (streamed: one LoRA) a block of rows at a
// time: the block is read from the base (the next one prefetched by the
// kernel meanwhile), decoded, fused as addLowRank does it (the same terms,
// the same sums in float64 and the same one rounding, on all cores),
// encoded and written at its place. in is the base tensor's dtype.
func fuseStreamed(ctx context.Context, t *fuseTensor, base *modelfolder.Folder, in safetensors.DType, w *safetensors.Writer) error {
	op := &t.ops[0]
	m := op.mod
	defer m.Release()
	a, b, err := m.Factors()
	if err != nil {
		return err
	}
	rows, n, r := t.shape[0], safetensors.Numel(t.shape), m.Rank
	cols := n / rows
	coef, vecs := lowRankTerms(a, b, rows, cols, r, float32(op.weight*m.Scaling), op.transposed)
	m.Release() // the factors are in the terms now
	to := roundingFor(t.dtype)
	step := max(1, streamBlock/max(1, cols)) // rows per block
	x := pool.Get(min(rows, step) * cols)
	defer pool.Put(x)
	raw := pool.Get((len(x)*in.Size() + 3) / 4)
	defer pool.Put(raw)
	enc := pool.Get((len(x)*t.dtype.Size() + 3) / 4)
	defer pool.Put(enc)
	inBytes, outBytes := int64(cols*in.Size()), int64(cols*t.dtype.Size()) // of a row
	for lo := 0; lo < rows; lo += step {
		if ctx.Err() != nil {
			return errs.ErrCancelled
		}
		hi := min(lo+step, rows)
		if hi < rows {
			base.Prefetch(t.src, int64(hi)*inBytes, int64(min(hi+step, rows)-hi)*inBytes)
		}
		xb := x[:(hi-lo)*cols]
		if in == safetensors.F32 {
			if err := base.ReadRawAt(t.src, int64(lo)*inBytes, safetensors.Float32AsBytes(xb)); err != nil {
				return err
			}
		} else {
			rb := safetensors.Float32AsBytes(raw)[:int64(hi-lo)*inBytes]
			if err := base.ReadRawAt(t.src, int64(lo)*inBytes, rb); err != nil {
				return err
			}
			safetensors.DecodeInto(xb, in, rb)
		}
		addTerms(xb, coef[lo*r:hi*r], vecs, hi-lo, cols, r, to)
		out := safetensors.Float32AsBytes(xb)
		if t.dtype != safetensors.F32 {
			out = safetensors.EncodeInto(safetensors.Float32AsBytes(enc)[:0], t.dtype, xb)
		}
		if err := w.WriteTensorPart(t.name, int64(lo)*outBytes, out); err != nil {
			return err
		}
	}
	return nil
}
