package methods

import (
	"context"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/safetensors"
)

// Source is one adapter's module with its user weight and the adapter's
// position in the merge (which labels its random streams).
type Source struct {
	Weight float64
	Mod    *adapter.Module
	Index  int
	// Optional DARE keep-masks (one byte per element, non-zero keeps), given
	// by the caller instead of gomerge's generator: for A, B and dW.
	MaskA, MaskB, MaskDW []byte
	// roundDW rounds the dense update to this dtype, as PEFT's
	// get_delta_weight does for half-precision factors ("" or F32: no rounding).
	RoundDW safetensors.DType
}

// ModuleJob is the work for one output module.
type ModuleJob struct {
	Name string
	Kind adapter.ModuleKind
	Srcs []Source
	In   int
	Out  int
	// shapes of A and B without the rank, for the output tensors
	ATail []int
	BTail []int
	// Param is the nn.Parameter the module adapts (target_parameters; ""
	// for a module) and Experts its number of experts (0 or 1: none).
	Param   string
	Experts int
}

// PatternKey is the path rank_pattern and alpha_pattern match for the job:
// its parameter's, or its module's.
func (j *ModuleJob) PatternKey() string {
	if j.Param != "" {
		return j.Param
	}
	return j.Name
}

// StackedRank is the number of rows of A for a rank per expert.
func (j *ModuleJob) StackedRank(r int) int { return r * max(j.Experts, 1) }

// ResultTensor is a merged tensor, encoded (Data) from its float32 memory
// (buf), which runJobs gives back to the pool once emit has written it.
type ResultTensor struct {
	safetensors.RawTensor
	Buf []float32
}

// RunModule merges one module by its method's row, recovering from panics
// so that a bug in a kernel becomes an error naming the module, and
// encodes the result to dt.
func RunModule(ctx context.Context, c *Combine, j *ModuleJob, rank int, dt safetensors.DType) (aName, bName string, ra, rb ResultTensor, out Outcome, err error) {
	defer func() {
		for _, s := range j.Srcs {
			s.Mod.Release()
		}
	}()
	defer func() {
		if p := recover(); p != nil { // a bug: read errors are returned, never raised
			err = errs.New(errs.KindInternal, "module %s: internal error: %v", j.Name, p)
		}
	}()
	merge := c.method.Merge
	if j.Experts > 1 {
		merge = expertsModule
	}
	o, err := merge(ctx, j, c, rank)
	if err != nil {
		return "", "", ResultTensor{}, ResultTensor{}, out, err
	}
	aName, bName = adapter.ModuleKeys(j.Name, j.Kind)
	aShape := append([]int{j.StackedRank(o.rank)}, j.ATail...)
	bShape := append([]int{j.Out, j.StackedRank(o.rank)}, j.BTail...)
	// a and b are this merge's own memory: float32 results are written as they are, without a copy
	encode := func(x []float32) []byte {
		if dt == safetensors.F32 {
			return safetensors.Float32AsBytes(x)
		}
		return safetensors.Encode(dt, x)
	}
	return aName, bName, ResultTensor{safetensors.RawTensor{DType: dt, Shape: aShape, Data: encode(o.a)}, o.a},
		ResultTensor{safetensors.RawTensor{DType: dt, Shape: bShape, Data: encode(o.b)}, o.b}, Outcome{Rank: o.rank, RelErr: o.relErr}, nil
}

// Outcome is what a module's merge chose: its rank, and the relative
// Frobenius error of its factorisation (NaN where there is none).
type Outcome struct {
	Rank   int
	RelErr float64
}
