package fuse

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/atomicdir"
	"gomerge/gomerge/methods"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/safetensors"
)

// fuseOpKind is what a fuse does to one tensor.
type fuseOpKind int

const (
	opLoRA    fuseOpKind = iota // W += w s B A (DoRA: then rescaled by its magnitude)
	opMerged                    // W += B'A', the adapters' factors merged first (scaling folded in)
	opBias                      // bias += w s lora_B.bias
	opReplace                   // W = a full tensor of the adapter (modules_to_save)
	opExpert                    // W (or its slice e) += part of expert e's update (experts.go)
)

// fuseOp is one change to one output tensor.
type fuseOp struct {
	kind       fuseOpKind
	adapter    int             // index of the adapter (opLoRA, opBias, opReplace)
	mod        *adapter.Module // opLoRA, opBias
	job        *methods.ModuleJob
	weight     float64               // the user's weight (opLoRA, opBias)
	replace    safetensors.RawTensor // opReplace
	transposed bool                  // the base stores the update transposed: fan_in_fan_out, embeddings
	expert     *expertOp             // opExpert
}

// fuseTensor is one tensor of the output: read from base tensor src (its
// own name, or the tied embedding for an untied lm_head) with its ops
// applied in order.
type fuseTensor struct {
	name, src string
	shape     []int
	dtype     safetensors.DType // the output dtype; "" for a tensor copied as it is (integers, ...)
	rawDType  string            // the base's dtype as written
	ops       []fuseOp
	quant     *quantTensor // a quantized weight of the base (quantized.go)
	stored    []int        // its shape in the output file when not shape (packed weights, quant_state)
}

// bytes is the tensor's size in the output.
func (t *fuseTensor) bytes() int64 {
	if t.dtype == "" {
		n, _ := safetensors.RawDTypeSize(t.rawDType)
		return int64(safetensors.Numel(t.storedShape()) * n)
	}
	return int64(safetensors.Numel(t.storedShape()) * t.dtype.Size())
}

// fusePlan is the whole output: its tensors, shards and config changes.
type fusePlan struct {
	tensors   []*fuseTensor // in output order (shard by shard)
	byName    map[string]*fuseTensor
	shards    []modelfolder.Shard
	indexed   bool
	merged    bool // several adapters merged before fusing
	untie     bool
	totalSize int64
	warnings  []string
	mergeOpts methods.Combine   // the merge before fusing (merged)
	rank      int               // its rank
	quant     *quantPlan        // a quantized base (quantized.go)
	renamed   map[string]string // base tensor -> its output name, when they differ (MXFP4 experts written dequantized)
}

// embeddingSuffixes name the input embeddings that an lm_head can be tied to.
var embeddingSuffixes = []string{"embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight"}

const lmHead = "lm_head.weight"

// tiedEmbedding returns the tensor that lm_head.weight is tied to: "" when
// the base stores lm_head.weight or its config unties it.
func tiedEmbedding(base *modelfolder.Folder) (string, error) {
	if _, ok := base.Info(lmHead); ok {
		return "", nil
	}
	if tie, ok := base.Config()["tie_word_embeddings"].(bool); ok && !tie {
		return "", nil
	}
	var found []string
	for _, n := range base.Names() {
		for _, s := range embeddingSuffixes {
			if n == s || strings.HasSuffix(n, "."+s) {
				found = append(found, n)
			}
		}
	}
	if len(found) != 1 {
		return "", errs.Value("%s: tie_word_embeddings is true but lm_head.weight's tied embedding cannot be told (candidates: %v)", base.Dir, found)
	}
	return found[0], nil
}

// planFuse maps every adapter tensor to the base tensor it changes,
// checks shapes and dtypes, and lays out the output. Nothing is read but
// headers; any error comes before anything is written.
func planFuse(opts *Options, base *modelfolder.Folder, adapters []*adapter.Adapter) (*fusePlan, error) {
	p := &fusePlan{byName: map[string]*fuseTensor{}, indexed: base.Sharded()}
	var outDType safetensors.DType
	if opts.DType != "" {
		outDType, _ = safetensors.ParseDType(opts.DType)
	}
	for _, name := range base.Names() {
		info, _ := base.Info(name)
		t := &fuseTensor{name: name, src: name, shape: info.Shape, dtype: info.DType, rawDType: info.RawDType}
		if outDType != "" && t.dtype != "" {
			t.dtype = outDType
		}
		p.byName[name] = t
	}
	if err := p.planQuant(opts, base); err != nil {
		return nil, err
	}
	tiedTo := ""
	tiedDone := false
	target := func(adapter int, name, what string) (*fuseTensor, error) {
		if t := p.byName[name]; t != nil {
			return t, nil
		}
		if name == lmHead && !tiedDone {
			tiedDone = true
			var err error
			if tiedTo, err = tiedEmbedding(base); err != nil {
				return nil, err
			}
		}
		if name == lmHead && tiedTo != "" {
			return p.untieLMHead(tiedTo), nil
		}
		return nil, errs.Value("adapter %s: %s targets %s, which the base model %s does not have (adapter file %s)",
			opts.Adapters[adapter], what, name, base.Dir, adapterFile(adapters[adapter]))
	}
	p.merged = len(adapters) > 1 && !opts.Stack
	var jobs map[string]*methods.ModuleJob
	if p.merged {
		var err error
		if jobs, err = p.planMergedJobs(opts, adapters); err != nil {
			return nil, err
		}
	}
	var all []string
	for _, a := range adapters {
		all = append(all, a.Order...)
	}
	layers := adapter.LayerCount(all) // what gradient weights spread over
	// full tensors (modules_to_save) first: an adapter's saved weights replace the base's before its LoRA applies
	replacedBy := map[string]int{}
	for i, a := range adapters {
		for _, key := range a.Extra {
			name := strings.TrimPrefix(key, adapter.KeyPrefix)
			if n, ok := strings.CutSuffix(name, ".base_layer.weight"); ok {
				name = n + ".weight" // the base weight of an adapted embedding, saved with the adapter
			}
			t, err := target(i, name, "tensor "+key)
			if err != nil {
				return nil, errs.Value("adapter %s: tensor %s is neither a LoRA factor nor a tensor of the base model %s (adapter file %s)",
					opts.Adapters[i], key, base.Dir, adapterFile(a))
			}
			raw := a.File.Tensor(key)
			if raw.DType == "" {
				return nil, errs.Value("adapter %s: tensor %s has dtype %s, which fuse does not read (F32, BF16, F16) (adapter file %s)",
					opts.Adapters[i], key, a.File.Entries[key].RawDType, adapterFile(a))
			}
			if !slices.Equal(raw.Shape, t.shape) {
				return nil, errs.Value("adapter %s: tensor %s has shape %v, but the base's %s has shape %v (adapter file %s)",
					opts.Adapters[i], key, raw.Shape, t.name, t.shape, adapterFile(a))
			}
			if err := t.checkFloat(base, key); err != nil {
				return nil, err
			}
			if j, ok := replacedBy[t.name]; ok && p.merged {
				return nil, errs.Value("adapters %s and %s both replace %s (modules_to_save); pass stack=True to apply them one after another",
					opts.Adapters[j], opts.Adapters[i], t.name)
			}
			replacedBy[t.name] = i
			t.ops = append(t.ops, fuseOp{kind: opReplace, adapter: i, replace: raw})
		}
		for _, name := range a.Order {
			m := a.Modules[name]
			if p.merged {
				if m.Magnitude.Shape != nil || m.Bias.Shape != nil {
					what := "a LoRA bias"
					if m.Magnitude.Shape != nil {
						what = "a DoRA magnitude vector"
					}
					return nil, errs.Value("adapter %s: module %s has %s, which cannot be merged with other adapters before fusing; pass stack=True to apply the adapters one after another",
						opts.Adapters[i], name, what)
				}
				continue
			}
			w, err := opts.Weights[i].Resolve(i, opts.Adapters[i], name, layers)
			if err != nil {
				return nil, err
			}
			if err := p.addModule(opts, i, a, m, w, nil, target, base); err != nil {
				return nil, err
			}
		}
	}
	if p.merged {
		names := make([]string, 0, len(jobs))
		for n := range jobs {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			j := jobs[n]
			s := j.Srcs[0]
			if err := p.addModule(opts, s.Index, adapters[s.Index], s.Mod, 1, j, target, base); err != nil {
				return nil, err
			}
		}
	}
	if _, stored := base.Info(lmHead); !stored && p.byName[lmHead] == nil {
		// an adapter that changes the embedding of a tied model: lm_head keeps the base matrix
		if emb, err := tiedEmbedding(base); err == nil && emb != "" && len(p.byName[emb].ops) > 0 {
			p.untieLMHead(emb)
		}
	}
	p.reserveQuantState()
	if err := p.layout(opts, base); err != nil {
		return nil, err
	}
	return p, nil
}

// adapterFile names an adapter's weights file in errors.
func adapterFile(a *adapter.Adapter) string { return a.File.Path }

// checkFloat refuses to change a tensor that is not stored as floats.
func (t *fuseTensor) checkFloat(base *modelfolder.Folder, by string) error {
	if t.dtype == "" && t.quant == nil {
		return errs.Value("%s: tensor %s has dtype %s, which fuse cannot write (it writes F32, BF16 and F16); %s targets it",
			base.Dir, t.src, t.rawDType, by)
	}
	return nil
}

// untieLMHead adds lm_head.weight to the output as a copy of the embedding
// it is tied to, and unties the config: the adapter changes one of the two.
func (p *fusePlan) untieLMHead(emb string) *fuseTensor {
	if t := p.byName[lmHead]; t != nil {
		return t
	}
	e := p.byName[emb]
	t := &fuseTensor{name: lmHead, src: emb, shape: e.shape, dtype: e.dtype, rawDType: e.rawDType}
	p.byName[lmHead] = t
	p.untie = true
	return t
}

// addModule plans one LoRA module (or, with job, the merge of several
// adapters' modules) on its base tensor: the shapes must be those of a
// Linear (out x in, or in x out with fan_in_fan_out), a Conv (out, in,
// kh, kw) or an Embedding (num_embeddings x dim), and a LoRA bias or a
// DoRA magnitude must fit the layer.
func (p *fusePlan) addModule(opts *Options, i int, a *adapter.Adapter, m *adapter.Module, w float64, job *methods.ModuleJob,
	target func(int, string, string) (*fuseTensor, error), base *modelfolder.Folder) error {
	aKey, _ := m.Keys()
	if m.Param != "" && m.RawA.Shape != nil {
		return p.addExperts(opts, i, a, m, w, job, target, base)
	}
	if m.RawA.Shape == nil || m.RawB.Shape == nil {
		return errs.Value("adapter %s: module %s has a DoRA magnitude or a LoRA bias but no LoRA factors (adapter file %s)", opts.Adapters[i], m.Name, adapterFile(a))
	}
	t, err := target(i, m.Name+".weight", "module "+m.Name)
	if err != nil {
		return err
	}
	if err := t.checkFloat(base, aKey); err != nil {
		return err
	}
	sa, out := m.RawA.Shape, m.Out()
	transposed := false
	var want []int
	switch {
	case m.Kind == adapter.KindEmbedding:
		want, transposed = []int{sa[1], out}, true
	case m.Kind == adapter.KindConv:
		want = append([]int{out}, sa[1:]...)
	case a.Config.FanInFanOut:
		want, transposed = []int{sa[1], out}, true
	default:
		want = []int{out, sa[1]}
	}
	if !slices.Equal(t.shape, want) {
		layout := ""
		if a.Config.FanInFanOut && m.Kind == adapter.KindLinear {
			layout = " (fan_in_fan_out: in x out)"
		}
		return errs.Value("adapter %s: module %s: lora_A %v and lora_B %v need a base weight of shape %v%s, but the base's %s has shape %v (adapter file %s)",
			opts.Adapters[i], m.Name, m.RawA.Shape, m.RawB.Shape, want, layout, t.src, t.shape, adapterFile(a))
	}
	if job != nil {
		t.ops = append(t.ops, fuseOp{kind: opMerged, job: job, transposed: transposed})
		return nil
	}
	if m.Magnitude.Shape == nil && a.Config.UseDora {
		return errs.Value("adapter %s: use_dora is true but module %s has no lora_magnitude_vector (adapter file %s)", opts.Adapters[i], m.Name, adapterFile(a))
	}
	if m.Magnitude.Shape != nil {
		if m.Kind == adapter.KindConv {
			return errs.Value("adapter %s: module %s: DoRA on convolutions is not supported by fuse (adapter file %s)", opts.Adapters[i], m.Name, adapterFile(a))
		}
		n := t.shape[0]
		if transposed {
			n = t.shape[1]
		}
		if safetensors.Numel(m.Magnitude.Shape) != n {
			return errs.Value("adapter %s: module %s: lora_magnitude_vector has shape %v, the layer has %d outputs (adapter file %s)",
				opts.Adapters[i], m.Name, m.Magnitude.Shape, n, adapterFile(a))
		}
	}
	t.ops = append(t.ops, fuseOp{kind: opLoRA, adapter: i, mod: m, weight: w, transposed: transposed})
	if m.Bias.Shape != nil {
		bt, err := target(i, m.Name+".bias", "the lora_B.bias of module "+m.Name)
		if err != nil {
			return errs.Value("adapter %s: module %s has a LoRA bias (lora_bias=True), but the base layer has no bias %s.bias (adapter file %s)",
				opts.Adapters[i], m.Name, m.Name, adapterFile(a))
		}
		if err := bt.checkFloat(base, m.Name+".lora_B.bias"); err != nil {
			return err
		}
		if safetensors.Numel(m.Bias.Shape) != safetensors.Numel(bt.shape) || safetensors.Numel(bt.shape) != out {
			return errs.Value("adapter %s: module %s: lora_B.bias has shape %v, the base's %s has shape %v (adapter file %s)",
				opts.Adapters[i], m.Name, m.Bias.Shape, bt.name, bt.shape, adapterFile(a))
		}
		bt.ops = append(bt.ops, fuseOp{kind: opBias, adapter: i, mod: m, weight: w})
	}
	return nil
}

// planMergedJobs pairs the modules of several adapters for a merge before
// fusing, with the merge's own validation (equal ranks for the factor-wise
// methods, shapes that agree, weights).
func (p *fusePlan) planMergedJobs(opts *Options, adapters []*adapter.Adapter) (map[string]*methods.ModuleJob, error) {
	c := opts.Combine // a copy: the seed drawn below is this fuse's own
	weights, err := adapter.CheckSources(opts.Adapters, opts.Weights)
	if err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	// the merge's own rule, as when the merge validated its options: no adapter at <output_dir>.merge
	if err := atomicdir.CheckApart(opts.OutputDir+".merge", opts.Adapters, "input adapter"); err != nil {
		return nil, err
	}
	p.warnings = append(p.warnings, c.PrepareRandomness()...)
	rank, err := c.NewRank(opts.Adapters, adapters)
	if err != nil {
		return nil, err
	}
	jobs, err := c.PlanModules(opts.Adapters, weights, adapters)
	if err != nil {
		return nil, err
	}
	p.mergeOpts, p.rank = c, rank
	out := make(map[string]*methods.ModuleJob, len(jobs))
	for i := range jobs {
		out[jobs[i].Name] = &jobs[i]
	}
	return out, nil
}

// layout places the output tensors into shards: the base's layout (an
// untied lm_head goes with its embedding), or a new split at max_shard_size.
func (p *fusePlan) layout(opts *Options, base *modelfolder.Folder) error {
	var order []string
	for _, s := range base.Shards() {
		var names []string
		for _, n := range s.Tensors {
			if r, ok := p.renamed[n]; ok {
				n = r
			}
			if p.byName[n] == nil {
				continue // a quantization statistic of a dequantized output
			}
			names = append(names, n)
			if t := p.byName[lmHead]; t != nil && t.src == n && t.name != n {
				names = append(names, lmHead)
			}
		}
		sort.Strings(names)
		p.shards = append(p.shards, modelfolder.Shard{Name: s.Name, Tensors: names})
		order = append(order, names...)
	}
	sizes := map[string]int64{}
	for _, n := range order {
		sizes[n] = p.byName[n].bytes()
		p.totalSize += sizes[n]
	}
	if opts.MaxShardSize > 0 {
		p.shards = modelfolder.Split(order, sizes, opts.MaxShardSize)
		p.indexed = len(p.shards) > 1
		for i := range p.shards {
			sort.Strings(p.shards[i].Tensors)
		}
	}
	for _, s := range p.shards {
		for _, n := range s.Tensors {
			p.tensors = append(p.tensors, p.byName[n])
		}
	}
	if len(p.tensors) != len(p.byName) {
		return errs.New(errs.KindInternal, "fuse layout: %d tensors placed of %d", len(p.tensors), len(p.byName))
	}
	return nil
}

// String is a tensor's plan, for debugging.
func (t *fuseTensor) String() string {
	return fmt.Sprintf("%s <- %s %v %s (%d ops)", t.name, t.src, t.shape, t.dtype, len(t.ops))
}
