package fuse

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/methods"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/safetensors"
)

// Fusing adapters on mixture-of-experts parameters (PEFT's target_parameters).
//
// The adapter names the parameter as the model holds it in memory, such as
// model.layers.0.mlp.experts.gate_up_proj [E, 2I, H]; transformers 5 saves
// many models in another layout and converts when it loads, as its
// conversion_mapping.py defines per architecture. Fuse maps the parameter
// onto the tensors on disk by that mapping (expertLayouts) and never guesses:
// a parameter none of them finds is refused naming the tensors looked for
// (modelfolder.ExpertLayouts).

// expertFactors is a parameter module's stacked factors (PEFT's layout,
// adapter/params.go), read or merged once and shared by the ops of every
// tensor it changes, released by the last of them.
type expertFactors struct {
	mod     *adapter.Module
	job     *methods.ModuleJob // a merge before fusing (nil: mod alone)
	weight  float64
	experts int
	once    sync.Once
	a, b    []float32
	pooled  bool
	r       int
	s       float32
	err     error
	left    atomic.Int32
}

// get returns the stacked factors, the rank per expert and the scaling.
func (x *expertFactors) get(ctx context.Context, p *fusePlan) ([]float32, []float32, int, float32, error) {
	x.once.Do(func() {
		if x.job != nil {
			_, _, ra, rb, _, err := methods.RunModule(ctx, &p.mergeOpts, x.job, p.rank, safetensors.F32)
			if err != nil {
				x.err = err
				return
			}
			x.a, x.b, x.r, x.s, x.pooled = ra.Buf, rb.Buf, ra.Shape[0]/x.experts, 1, true
			return
		}
		a, err := adapter.View(x.mod.RawA)
		if err != nil {
			x.err = err
			return
		}
		b, err := adapter.View(x.mod.RawB)
		if err != nil {
			x.err = err
			return
		}
		x.a, x.b, x.r, x.s = a, b, x.mod.Rank, float32(x.weight*x.mod.Scaling)
		x.pooled = x.mod.RawA.File() != nil
	})
	return x.a, x.b, x.r, x.s, x.err
}

// done releases the factors after the last op that uses them.
func (x *expertFactors) done() {
	if x.left.Add(-1) == 0 && x.pooled && x.err == nil {
		pool.Put(x.a)
		pool.Put(x.b)
		x.a, x.b = nil, nil
	}
}

// expertOp is an op's part for one expert of a parameter: expert e's update
// B_e[rowLo:rowHi] A_e (or all of it, transposed) added to the tensor, or,
// for a 3-D tensor holding every expert, to its slice e.
type expertOp struct {
	src          *expertFactors
	expert       int
	rowLo, rowHi int
	stacked      bool // the tensor is [E, d1, d2]
}

// describe names the op in a fuse's result: the expert, its parameter, and
// the rows of its update that the tensor takes.
func (x *expertOp) describe() string {
	what := "lora"
	if x.src.job != nil {
		what = fmt.Sprintf("lora (%d adapters merged)", len(x.src.job.Srcs))
	}
	if x.stacked {
		return fmt.Sprintf("%s, expert %d of %s", what, x.expert, x.src.mod.Param)
	}
	return fmt.Sprintf("%s, expert %d of %s, rows %d-%d", what, x.expert, x.src.mod.Param, x.rowLo, x.rowHi-1)
}

// applyExpert adds the op's expert update to w (the whole tensor).
func applyExpert(ctx context.Context, p *fusePlan, t *fuseTensor, op *fuseOp, w []float32) error {
	x := op.expert
	defer x.src.done()
	a, b, r, s, err := x.src.get(ctx, p)
	if err != nil {
		return err
	}
	experts := x.src.experts
	in := len(a) / (r * experts)
	out := len(b) / (r * experts)
	ae := a[x.expert*r*in : (x.expert+1)*r*in]
	rows := x.rowHi - x.rowLo
	be := pool.Get(rows * r)
	defer pool.Put(be)
	for o := x.rowLo; o < x.rowHi; o++ {
		src := b[o*r*experts : (o+1)*r*experts]
		d := be[(o-x.rowLo)*r : (o-x.rowLo+1)*r]
		for k := range r {
			d[k] = src[k*experts+x.expert]
		}
	}
	if !x.stacked {
		addLowRank(w, ae, be, rows, in, r, s, false, t.dtype)
		return nil
	}
	n := out * in
	ws := w[x.expert*n : (x.expert+1)*n]
	if op.transposed { // ws is in x out
		addLowRank(ws, ae, be, in, out, r, s, true, t.dtype)
	} else {
		addLowRank(ws, ae, be, out, in, r, s, false, t.dtype)
	}
	return nil
}

// addExperts plans a module that adapts an expert parameter (m, or the
// merge job) onto the base's tensors.
func (p *fusePlan) addExperts(opts *Options, i int, a *adapter.Adapter, m *adapter.Module, w float64, job *methods.ModuleJob,
	target func(int, string, string) (*fuseTensor, error), base *modelfolder.Folder) error {
	experts := max(m.Experts, 1)
	in, out := m.In(), m.Out()
	src := &expertFactors{mod: m, job: job, weight: w, experts: experts}
	where := fmt.Sprintf("adapter %s: module %s (parameter %s, %d experts, adapter file %s)", opts.Adapters[i], m.Name, m.Param, experts, adapterFile(a))
	add := func(t *fuseTensor, op expertOp, transposed bool) error {
		if err := t.checkFloat(base, m.Param); err != nil {
			return err
		}
		op.src = src
		src.left.Add(1)
		t.ops = append(t.ops, fuseOp{kind: opExpert, adapter: i, expert: &op, transposed: transposed})
		return nil
	}
	module, pname := m.Param[:strings.LastIndex(m.Param, ".")], m.Param[strings.LastIndex(m.Param, ".")+1:]
	// the parameter as it is in memory: gpt-oss and checkpoints saved in the fused layout
	if info, ok := base.Info(m.Param); ok {
		t, _ := target(i, m.Param, where)
		transposed := slices.Contains(modelfolder.TransposedExperts, base.ModelType())
		want := []int{experts, out, in}
		if transposed {
			want = []int{experts, in, out}
		}
		if experts == 1 && slices.Equal(info.Shape, []int{out, in}) { // a 2-D parameter: a Linear's weight
			return add(t, expertOp{expert: 0, rowLo: 0, rowHi: out}, false)
		}
		if !slices.Equal(info.Shape, want) {
			return errs.Value("%s: needs the base's %s to have shape %v, but it has %v (expert count or size disagree)", where, m.Param, want, info.Shape)
		}
		for e := range experts {
			if err := add(t, expertOp{expert: e, rowLo: 0, rowHi: out, stacked: true}, transposed); err != nil {
				return err
			}
		}
		return nil
	}
	if t := p.mxfp4Param(m.Param); t != nil { // MXFP4 experts, [E, in, out] once dequantized
		if want := []int{experts, in, out}; !slices.Equal(t.shape, want) {
			return errs.Value("%s: needs the base's %s to have shape %v, but its MXFP4 %s is %v once dequantized (expert count or size disagree)",
				where, m.Param, want, t.src, t.shape)
		}
		for e := range experts {
			if err := add(t, expertOp{expert: e, rowLo: 0, rowHi: out, stacked: true}, true); err != nil {
				return err
			}
		}
		return nil
	}
	for _, suffix := range []string{"_blocks", "_scales"} {
		if _, ok := base.Info(m.Param + suffix); ok {
			return errs.Value("%s: the base stores %s as %s%s, MXFP4-quantized experts (gpt-oss's released format), "+
				"but its config has no quantization_config with quant_method \"mxfp4\"", where, m.Param, m.Param, suffix)
		}
	}
	var tried []string
	for _, l := range modelfolder.ExpertLayoutsFor(base.ModelType()) {
		pieces := l.Pieces[pname]
		if pieces == nil {
			continue
		}
		disk := module
		if l.Rename[0] != "" {
			if !strings.Contains(module, l.Rename[0]) {
				continue
			}
			disk = strings.Replace(module, l.Rename[0], l.Rename[1], 1)
		}
		first := fmt.Sprintf("%s.0.%s.weight", disk, pieces[0])
		tried = append(tried, first)
		if _, ok := base.Info(first); !ok {
			continue
		}
		if _, ok := base.Info(fmt.Sprintf("%s.%d.%s.weight", disk, experts, pieces[0])); ok {
			return errs.Value("%s: the base has more than %d experts at %s (%s.%d.%s.weight exists): the expert counts disagree",
				where, experts, disk, disk, experts, pieces[0])
		}
		for e := range experts {
			lo := 0
			for _, piece := range pieces {
				name := fmt.Sprintf("%s.%d.%s.weight", disk, e, piece)
				info, ok := base.Info(name)
				if !ok {
					return errs.Value("%s: the base has no tensor %s (the %s layout of transformers' conversion mapping; "+
						"the expert counts disagree or the checkpoint is incomplete)", where, name, l.Name)
				}
				if len(info.Shape) != 2 || info.Shape[1] != in || lo+info.Shape[0] > out {
					return errs.Value("%s: the base's %s has shape %v, which does not fit the update of expert %d (%d x %d, %s layout)",
						where, name, info.Shape, e, out, in, l.Name)
				}
				t, _ := target(i, name, where)
				if err := add(t, expertOp{expert: e, rowLo: lo, rowHi: lo + info.Shape[0]}, false); err != nil {
					return err
				}
				lo += info.Shape[0]
			}
			if lo != out {
				return errs.Value("%s: the base's per-expert %v of expert %d have %d rows together, the update has %d", where, pieces, e, lo, out)
			}
		}
		return nil
	}
	if len(tried) == 0 {
		tried = []string{fmt.Sprintf("(no per-expert layout of %s for model_type %q in transformers' conversion mapping)", pname, base.ModelType())}
	}
	return errs.Value("%s: the base model %s has no tensor for this parameter: looked for %s as it is in memory and, by transformers' "+
		"conversion mapping, %s; gomerge does not guess other layouts", where, base.Dir, m.Param, strings.Join(tried, ", "))
}
