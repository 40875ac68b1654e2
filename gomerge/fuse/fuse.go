package fuse

import (
	"context"
	"fmt"
	"time"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/atomicdir"
	"gomerge/gomerge/methods"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/safetensors"
)

// Options are the arguments of a fuse: LoRA adapters folded into the
// weights of their base model, written as a new model folder.
type Options struct {
	Base     string   `json:"base"`     // the base model folder
	Adapters []string `json:"adapters"` // PEFT adapter directories
	// Weights has one weight per adapter (1 when empty): a number, or
	// module-name patterns with their weights, as for Merge.
	Weights adapter.Weights `json:"weights"`
	// Combine chooses how several adapters are merged before fusing (the
	// methods of Merge; "cat", the exact sum of the weighted updates, by
	// default). With Stack they are applied one after another instead.
	methods.Combine
	Stack        bool     `json:"stack"`
	OutputDir    string   `json:"output_dir"`
	Overwrite    bool     `json:"overwrite"`
	DType        string   `json:"dtype"`          // "" keeps each tensor's dtype
	MaxShardSize int64    `json:"max_shard_size"` // bytes; 0 keeps the base's shard layout
	DryRun       bool     `json:"dry_run"`        // plan and report, write nothing
	BaseName     string   `json:"base_name"`      // how the user named the base (for the model card)
	SourceNames  []string `json:"source_names"`   // how the user named the adapters (for the model card)
	Workers      int      `json:"workers"`        // tensors fused at once; 0: twice the cores
	// KeepFormat writes a quantized base's changed tensors requantized to
	// its own format (untouched tensors byte for byte); DType instead writes
	// it dequantized. See quantized.go.
	KeepFormat bool `json:"keep_format"`
	// SurvivalThreshold: a changed quantized tensor keeping less of its
	// update is named in a warning (nil: DefaultSurvivalThreshold).
	SurvivalThreshold *float64 `json:"survival_threshold"`
	// ReferenceBase is the 16-bit original of a quantized base, for the
	// report's reference gap and MergeBase "w16".
	ReferenceBase string `json:"reference_base"`
	// MergeBase is what the update is added to: "dequant" (the quantized
	// base dequantized, the default) or "w16" (ReferenceBase's weights).
	MergeBase string `json:"merge_base"`

	oneAdapterMethod string // a combination_type given for one adapter, which nothing merges
}

// Change is one tensor of the output that differs from the base.
type Change struct {
	Tensor   string   `json:"tensor"`
	Shape    []int    `json:"shape"`
	DType    string   `json:"dtype"`
	Ops      []string `json:"ops"`      // what is applied, in order: lora, dora, bias, replace, copy
	Adapters []string `json:"adapters"` // the adapters it comes from
}

// Result describes a fuse (or, with DryRun, what it would do).
type Result struct {
	OutputDir       string   `json:"output_dir"`
	Base            string   `json:"base"`
	Adapters        []string `json:"adapters"`
	CombinationType string   `json:"combination_type"` // "" for one adapter or a stack
	Stack           bool     `json:"stack"`
	Tensors         int      `json:"tensors"`
	Changed         []Change `json:"changed"`
	Shards          []string `json:"shards"`
	TotalSize       int64    `json:"total_size"`
	Untied          bool     `json:"untied"` // tie_word_embeddings was set to false
	DryRun          bool     `json:"dry_run"`
	Seconds         float64  `json:"seconds"`
	Warnings        []string `json:"warnings"`
	// Quantized is the survival report of a quantized base (nil otherwise).
	Quantized *QuantReport `json:"quantized,omitempty"`
}

// validate checks the options before any file is read.
func (o *Options) validate() error {
	if o.Base == "" {
		return errs.Value("base: a base model folder is required")
	}
	if len(o.Adapters) == 0 {
		return errs.Value("adapters: at least one adapter directory is required")
	}
	if len(o.Weights) == 0 {
		o.Weights = make(adapter.Weights, len(o.Adapters))
		for i := range o.Weights {
			o.Weights[i] = adapter.Weight{Value: 1}
		}
	}
	if len(o.Weights) != len(o.Adapters) {
		return errs.Value("weights: got %d weights for %d adapters; pass one weight per adapter", len(o.Weights), len(o.Adapters))
	}
	if o.CombinationType == "" {
		o.CombinationType = "cat"
	} else if len(o.Adapters) == 1 && o.CombinationType != "cat" {
		o.oneAdapterMethod = o.CombinationType
	}
	if o.Stack && len(o.Adapters) > 1 && o.CombinationType != "cat" {
		return errs.Value("combination_type: %q merges adapters before fusing; stack=True applies them one after another instead (pass one or the other)", o.CombinationType)
	}
	if len(o.Adapters) > 1 && !o.Stack { // the merge before fusing: its parameters are checked before any file is read
		if err := o.Combine.Validate(); err != nil {
			return err
		}
	}
	if o.DType != "" {
		if _, err := safetensors.ParseDType(o.DType); err != nil {
			return err
		}
	}
	if o.MaxShardSize < 0 {
		return errs.Value("max_shard_size: must be positive, got %d", o.MaxShardSize)
	}
	if o.OutputDir == "" && !o.DryRun {
		return errs.Value("output_dir: a directory to write the fused model to is required")
	}
	if o.OutputDir != "" {
		return atomicdir.CheckApart(o.OutputDir, append([]string{o.Base}, o.Adapters...), "input")
	}
	return nil
}

// Fuse folds the adapters into the base model's weights, W' = W + s B A
// per adapted layer as PEFT's merge_and_unload computes it (DoRA, LoRA
// biases and modules_to_save included), in float32 with one rounding to
// the output dtype, and writes the model folder atomically. It streams: a
// tensor with one LoRA is read, fused and written a block of rows at a
// time, other changed tensors are whole in memory one per worker, within a
// budget of twice the largest. progress counts
// output tensors; ctx cancels (nothing is left behind).
func Fuse(ctx context.Context, opts Options, progress *parallel.Progress) (*Result, error) {
	start := time.Now()
	if err := opts.validate(); err != nil {
		return nil, err
	}
	if !opts.DryRun {
		if err := modelfolder.CheckOutput(opts.OutputDir, opts.Overwrite); err != nil {
			return nil, err
		}
	}
	defer parallel.HoldGCHeadroom()()
	base, err := modelfolder.Open(opts.Base)
	if err != nil {
		return nil, err
	}
	defer base.Close()
	adapters, err := adapter.LoadAll(opts.Adapters, true)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, a := range adapters {
			a.Close()
		}
	}()
	plan, err := planFuse(&opts, base, adapters)
	if plan != nil {
		defer plan.quant.close()
	}
	if err != nil {
		return nil, err
	}
	res := plan.result(&opts)
	for i, a := range adapters {
		res.Warnings = append(res.Warnings, opts.Weights[i].UnusedPatterns(i, opts.Adapters[i], a.Order)...)
	}
	if opts.oneAdapterMethod != "" {
		res.Warnings = append(res.Warnings, fmt.Sprintf("one adapter only: combination_type %q is not used (nothing to merge); the adapter is fused as it is", opts.oneAdapterMethod))
	}
	if opts.DryRun || ctx.Err() != nil {
		if ctx.Err() != nil {
			return nil, errs.ErrCancelled
		}
		if plan.quant != nil {
			if err := plan.quant.evaluate(ctx, plan, base, opts.Workers); err != nil {
				return nil, err
			}
			plan.quant.finish(&opts, res)
		}
		res.Seconds = time.Since(start).Seconds()
		return res, nil
	}
	if err := writeFused(ctx, &opts, plan, base, progress); err != nil {
		return nil, err
	}
	if plan.quant != nil {
		plan.quant.finish(&opts, res)
	}
	res.Seconds = time.Since(start).Seconds()
	return res, nil
}

// sourceName is how the user named adapter i.
func (o *Options) sourceName(i int) string {
	if len(o.SourceNames) == len(o.Adapters) {
		return o.SourceNames[i]
	}
	return o.Adapters[i]
}

func (o *Options) baseName() string {
	if o.BaseName != "" {
		return o.BaseName
	}
	return o.Base
}

func (p *fusePlan) result(opts *Options) *Result {
	res := &Result{OutputDir: opts.OutputDir, Base: opts.baseName(), Stack: opts.Stack, DryRun: opts.DryRun,
		Tensors: len(p.tensors), Changed: []Change{}, Untied: p.untie, TotalSize: p.totalSize,
		Warnings: append([]string{}, p.warnings...)}
	for i := range opts.Adapters {
		res.Adapters = append(res.Adapters, opts.sourceName(i))
	}
	if p.merged {
		res.CombinationType = opts.CombinationType
	}
	for _, s := range p.shards {
		res.Shards = append(res.Shards, s.Name)
	}
	for _, t := range p.tensors {
		if len(t.ops) == 0 && t.name == t.src {
			continue
		}
		c := Change{Tensor: t.name, Shape: t.shape, DType: t.dtypeName(), Ops: []string{}, Adapters: []string{}}
		if t.name != t.src && t.quant != nil {
			c.Ops = append(c.Ops, "dequantized from "+t.src)
		} else if t.name != t.src {
			c.Ops = append(c.Ops, "copy of "+t.src)
		}
		seen := map[int]bool{}
		for _, op := range t.ops {
			c.Ops = append(c.Ops, op.describe())
			for _, i := range op.adapterIndexes() {
				if !seen[i] {
					seen[i] = true
					c.Adapters = append(c.Adapters, opts.sourceName(i))
				}
			}
		}
		res.Changed = append(res.Changed, c)
	}
	if len(res.Changed) == 0 {
		res.Warnings = append(res.Warnings, "no tensor of the base model is changed by the adapters")
	}
	return res
}

func (t *fuseTensor) dtypeName() string {
	if t.dtype == "" {
		return t.rawDType
	}
	return t.dtype.TorchName()
}

func (op *fuseOp) describe() string {
	switch op.kind {
	case opReplace:
		return "replace"
	case opBias:
		return "bias"
	case opMerged:
		return fmt.Sprintf("lora (%d adapters merged)", len(op.job.Srcs))
	case opExpert:
		return op.expert.describe()
	}
	if op.mod.Magnitude.Shape != nil {
		return "dora"
	}
	return "lora"
}

func (op *fuseOp) adapterIndexes() []int {
	job := op.job
	if op.kind == opExpert {
		job = op.expert.src.job
	}
	if op.kind == opMerged || job != nil {
		out := make([]int, len(job.Srcs))
		for i, s := range job.Srcs {
			out[i] = s.Index
		}
		return out
	}
	return []int{op.adapter}
}
