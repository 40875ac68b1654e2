package gomerge

import (
	"context"
	"fmt"
	"unsafe"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/methods"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/safetensors"
)

// MemSource is one source adapter's factors of a module, in memory owned by
// the caller (a model's tensors): raw addresses of contiguous float32
// buffers, kept alive by the caller for the whole merge.
type MemSource struct {
	A       uintptr `json:"a"`       // lora_A, (r, ...) float32
	B       uintptr `json:"b"`       // lora_B, (out, r, 1...) float32
	AShape  []int   `json:"a_shape"` // shape of lora_A
	BShape  []int   `json:"b_shape"` // shape of lora_B
	Scaling float64 `json:"scaling"`
	Weight  float64 `json:"weight"`
	Index   int     `json:"index"`  // position of the adapter in the merge
	MaskA   uintptr `json:"mask_a"` // optional uint8 DARE masks (0: gomerge draws its own)
	MaskB   uintptr `json:"mask_b"`
	MaskDW  uintptr `json:"mask_dw"`
	RoundDW string  `json:"round_dw"` // dtype the dense update is rounded to ("": none)
}

// MemModule is one module of an in-memory merge and where its result goes:
// float32 buffers of OutRank x In (A) and Out x OutRank (B), allocated by
// the caller. The merge writes every element: the merged factors, and zeros
// beyond the merged rank (so the buffers may be uninitialised, or the new
// adapter's own tensors).
type MemModule struct {
	Name    string      `json:"name"`
	Sources []MemSource `json:"sources"`
	OutA    uintptr     `json:"out_a"`
	OutB    uintptr     `json:"out_b"`
	OutRank int         `json:"out_rank"`
}

// MemRequest is an in-memory merge: the combination arguments
// (CombinationType as PEFT resolved it, Rank the merged adapter's rank) and
// the modules.
type MemRequest struct {
	methods.Combine
	Rank    int         `json:"rank"`
	Modules []MemModule `json:"modules"`
	// TorchMasks, when set, draws the DARE masks that the sources point to
	// before the merge (see TorchMasks).
	TorchMasks *TorchMasks `json:"torch_masks"`
}

// MemResult describes a finished in-memory merge: the rank written for each
// module, in request order.
type MemResult struct {
	Ranks    []int    `json:"ranks"`
	Seed     *uint64  `json:"seed"`
	Seconds  float64  `json:"seconds"`
	Warnings []string `json:"warnings"`
	// TorchPos is the generator's position after TorchMasks drew (its
	// state words were advanced in place); nil without TorchMasks.
	TorchPos *int `json:"torch_pos"`
}

// viewMemory is the one place where a caller's raw address becomes a Go
// slice. The caller guarantees that n bytes at ptr stay valid and unmoved
// for the whole call (Python keeps the tensors alive). The address is read
// through a pointer so that it is never held as a bare uintptr conversion.
func viewMemory(ptr uintptr, n int) []byte {
	if ptr == 0 || n == 0 {
		return nil
	}
	p := *(*unsafe.Pointer)(unsafe.Pointer(&ptr))
	return unsafe.Slice((*byte)(p), n)
}

// MergeTensors runs a merge on tensors in memory and writes every module's
// merged factors to the caller's output buffers.
func MergeTensors(ctx context.Context, req MemRequest, progress *parallel.Progress) (res *MemResult, err error) {
	opts := Options{Combine: req.Combine}
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	if req.Rank <= 0 {
		return nil, errs.Value("rank: must be positive, got %d", req.Rank)
	}
	defer parallel.HoldGCHeadroom()()
	res = &MemResult{Warnings: opts.PrepareRandomness()}
	res.Seed = opts.Seed
	var ready func(i int) error
	if tm := req.TorchMasks; tm != nil {
		stream, total, serr := tm.start(ctx)
		if serr != nil {
			return nil, serr
		}
		// the drawing writes into the caller's buffers: it ends before the merge returns, whatever happens
		defer func() {
			pos, serr := stream.finish()
			if err == nil && serr != nil {
				res, err = nil, serr
			}
			if err == nil {
				res.TorchPos = &pos
			}
		}()
		ready = func(i int) error { return stream.wait(maskEnd(req.Modules[i], tm.Out, total)) }
	}
	jobs := make([]methods.ModuleJob, len(req.Modules))
	for i, mm := range req.Modules {
		j, err := memJob(mm, opts.Method())
		if err != nil {
			return nil, err
		}
		jobs[i] = j
	}
	outcomes, err := runJobs(ctx, &opts.Combine, opts.Workers, jobs, req.Rank, safetensors.F32, progress, ready, func(i int, _, _ string, a, b safetensors.RawTensor) error {
		mm := req.Modules[i]
		if a.Shape[0] > mm.OutRank {
			return errs.Value("module %s: merged rank %d does not fit the output rank %d", mm.Name, a.Shape[0], mm.OutRank)
		}
		outA := viewMemory(mm.OutA, 4*mm.OutRank*safetensors.Numel(jobs[i].ATail))
		clear(outA[copy(outA, a.Data):])
		outB := viewMemory(mm.OutB, 4*jobs[i].Out*mm.OutRank)
		r := a.Shape[0]
		for row := 0; row < jobs[i].Out; row++ { // B is Out x r inside an Out x OutRank buffer
			dst := outB[4*row*mm.OutRank : 4*(row+1)*mm.OutRank]
			clear(dst[copy(dst, b.Data[4*row*r:4*(row+1)*r]):])
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	res.Ranks = make([]int, len(outcomes))
	for i, o := range outcomes {
		res.Ranks[i] = o.Rank
	}
	return res, nil
}

// memJob turns a module of a request into a job over views of its memory.
func memJob(mm MemModule, method methods.Method) (methods.ModuleJob, error) {
	if len(mm.Sources) == 0 {
		return methods.ModuleJob{}, errs.Value("module %s: no source adapter", mm.Name)
	}
	var j methods.ModuleJob
	for i, s := range mm.Sources {
		if len(s.AShape) < 2 || len(s.BShape) != len(s.AShape) || s.AShape[0] != s.BShape[1] || s.A == 0 || s.B == 0 {
			return j, errs.Value("module %s: source %d has factors of shapes %v and %v that are not LoRA factors", mm.Name, s.Index, s.AShape, s.BShape)
		}
		m := &adapter.Module{Name: mm.Name, Kind: adapter.KindLinear, Rank: s.AShape[0], Scaling: s.Scaling,
			RawA: safetensors.RawTensor{DType: safetensors.F32, Shape: s.AShape, Data: viewMemory(s.A, 4*safetensors.Numel(s.AShape))},
			RawB: safetensors.RawTensor{DType: safetensors.F32, Shape: s.BShape, Data: viewMemory(s.B, 4*safetensors.Numel(s.BShape))}}
		if i == 0 {
			j = methods.ModuleJob{Name: mm.Name, In: m.In(), Out: m.Out(), ATail: s.AShape[1:], BTail: s.BShape[2:]}
		} else if m.In() != j.In || m.Out() != j.Out {
			return j, errs.Value("module %s: factors of source %d (%v, %v) do not match the first source's", mm.Name, s.Index, s.AShape, s.BShape)
		}
		if method.Rank.Own && i > 0 && m.Rank != j.Srcs[0].Mod.Rank {
			return j, errs.Value("module %s: combination_type %s needs equal ranks, got %d and %d", mm.Name, method.Name, j.Srcs[0].Mod.Rank, m.Rank)
		}
		src := methods.Source{Weight: s.Weight, Mod: m, Index: s.Index,
			MaskA: viewMemory(s.MaskA, safetensors.Numel(s.AShape)), MaskB: viewMemory(s.MaskB, safetensors.Numel(s.BShape)),
			MaskDW: viewMemory(s.MaskDW, m.In()*m.Out())}
		if s.RoundDW != "" {
			dt, err := safetensors.ParseDType(s.RoundDW)
			if err != nil {
				return j, fmt.Errorf("module %s: %w", mm.Name, err)
			}
			src.RoundDW = dt
		}
		j.Srcs = append(j.Srcs, src)
	}
	if mm.OutA == 0 || mm.OutB == 0 || mm.OutRank <= 0 {
		return j, errs.Value("module %s: missing output buffers", mm.Name)
	}
	return j, nil
}
