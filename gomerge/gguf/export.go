package gguf

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/atomicdir"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/safetensors"
)

// What an export may leave out when asked (Options.Drop); anything else
// llama.cpp cannot represent is an error.
const (
	DropModulesToSave = "modules_to_save" // full tensors of the adapter (modules_to_save, saved norms)
	DropLoraBias      = "lora_bias"       // lora_B biases (the LoRA factors are kept)
	DropLMHead        = "lm_head"         // an lm_head LoRA over a base whose lm_head is tied to the embeddings
)

// typeAdapter stands for the adapter's own dtype in Options.check.
const typeAdapter GGMLType = 1<<32 - 1

var dropChoices = []string{DropModulesToSave, DropLoraBias, DropLMHead}

// Options are the arguments of an export to GGUF.
type Options struct {
	Adapter   string   `json:"adapter"`   // the PEFT adapter directory
	Base      string   `json:"base"`      // the base model's folder or its config.json (only that file is read)
	Output    string   `json:"output"`    // the .gguf file to write
	DType     string   `json:"dtype"`     // f32, f16, bf16 or q8_0; "" keeps the adapter's (f32, f16, bf16)
	Drop      []string `json:"drop"`      // what may be left out: modules_to_save, lora_bias, lm_head
	Overwrite bool     `json:"overwrite"` // replace an existing GGUF file
	Name      string   `json:"name"`      // general.name; "" uses the output's file name
	Workers   int      `json:"workers"`   // modules written at once; 0 uses all cores
}

// Result describes an export.
type Result struct {
	Output       string         `json:"output"`
	Architecture string         `json:"architecture"` // general.architecture
	Modules      int            `json:"modules"`      // LoRA modules written
	Tensors      int            `json:"tensors"`      // tensors written (two per module)
	DType        string         `json:"dtype"`
	Size         int64          `json:"size"`         // bytes
	Ranks        map[string]int `json:"ranks"`        // rank -> modules (as a string, for JSON)
	Dropped      []string       `json:"dropped"`      // what Drop left out, each with the reason
	F16Fallback  []string       `json:"f16_fallback"` // q8_0 tensors written as f16 (rows not a multiple of 32)
	Skipped      []string       `json:"skipped"`      // base weights PEFT saved beside the LoRA (save_embedding_layers)
	Seconds      float64        `json:"seconds"`
}

// job is one module to write: its factors' gguf tensors and how to fill them.
type job struct {
	m        *adapter.Module
	a, b     int // indices in the tensor list
	embed    bool
	permute  int // heads of the Q/K row permutation of B; 0 for none
	ggufName string
}

// Export writes the adapter directory opts.Adapter as a GGUF LoRA adapter
// for the base described by opts.Base's config.json.
func Export(ctx context.Context, opts Options, progress *parallel.Progress) (*Result, error) {
	start := time.Now()
	outType, err := opts.check()
	if err != nil {
		return nil, err
	}
	base, err := ReadBase(opts.Base)
	if err != nil {
		return nil, err
	}
	ads, err := adapter.LoadAll([]string{opts.Adapter}, true)
	if err != nil {
		return nil, err
	}
	ad := ads[0]
	defer ad.Close()
	if outType == typeAdapter {
		outType = map[safetensors.DType]GGMLType{safetensors.F32: TypeF32, safetensors.F16: TypeF16, safetensors.BF16: TypeBF16}[ad.DType]
	}
	res := &Result{Output: opts.Output, Architecture: base.Arch.Name, DType: outType.String(), Ranks: map[string]int{},
		Dropped: []string{}, F16Fallback: []string{}, Skipped: []string{}}
	jobs, tensors, err := plan(ad, base, &opts, outType, res)
	if err != nil {
		return nil, err
	}
	name := opts.Name
	if name == "" {
		name = strings.TrimSuffix(filepath.Base(opts.Output), ".gguf")
	}
	kvs := []KV{
		{"general.architecture", base.Arch.Name},
		{"general.type", "adapter"},
		{"general.name", name},
		{"general.file_type", fileType(outType)},
		{"general.quantization_version", uint32(2)},
		{"adapter.type", "lora"},
		// 0: llama.cpp scales each pair by the user's scale alone; each module's PEFT scale is in its B
		{"adapter.lora.alpha", float32(0)},
	}
	header, dataSize := Header(kvs, tensors)
	if progress != nil {
		progress.Total.Store(int64(len(jobs)))
	}
	out, err := atomicdir.CreateFile(opts.Output, opts.Overwrite, fileKind)
	if err != nil {
		return nil, err
	}
	if err := write(ctx, out.Tmp, header, dataSize, jobs, tensors, opts.Workers, progress); err != nil {
		out.Abort()
		return nil, err
	}
	if err := out.Commit(); err != nil {
		return nil, err
	}
	res.Modules, res.Tensors = len(jobs), len(tensors)
	res.Size = int64(len(header)) + dataSize
	res.Seconds = time.Since(start).Seconds()
	return res, nil
}

// fileKind: overwrite replaces only a GGUF file.
var fileKind = atomicdir.FileKind{What: "a GGUF file", Is: func(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	b := make([]byte, 4)
	_, err = io.ReadFull(f, b)
	return err == nil && string(b) == magic
}}

// check validates the options before any file is read; it returns the
// output type, or typeAdapter for the adapter's.
func (o *Options) check() (GGMLType, error) {
	if o.Adapter == "" {
		return 0, errs.Value("adapter: an adapter directory is required")
	}
	if o.Base == "" {
		return 0, errs.Value("base: the base model's folder (or its config.json) is required to name the tensors")
	}
	if o.Output == "" {
		return 0, errs.Value("output: the path of the .gguf file to write is required")
	}
	if err := atomicdir.CheckApart(o.Output, []string{o.Adapter}, "input adapter"); err != nil {
		return 0, err
	}
	for _, d := range o.Drop {
		if !slices.Contains(dropChoices, d) {
			return 0, errs.Value("drop: unknown choice %q (expected some of %s)", d, strings.Join(dropChoices, ", "))
		}
	}
	switch strings.ToLower(o.DType) {
	case "":
		return typeAdapter, nil
	case "f32", "float32":
		return TypeF32, nil
	case "f16", "float16":
		return TypeF16, nil
	case "bf16", "bfloat16":
		return TypeBF16, nil
	case "q8_0":
		return TypeQ8_0, nil
	}
	return 0, errs.Value("dtype: %q is not a GGUF adapter type (expected f32, f16, bf16 or q8_0)", o.DType)
}

// plan checks every tensor of the adapter against what llama.cpp can load
// and lists the modules to write and their tensors.
func plan(ad *adapter.Adapter, base *Base, opts *Options, outType GGMLType, res *Result) ([]job, []TensorInfo, error) {
	dir := ad.Dir
	if ad.Config.UseDora {
		return nil, nil, errs.Value("%s: use_dora is true; llama.cpp's LoRA adapters cannot carry DoRA's magnitude vectors "+
			"(fuse the adapter into the base with `gomerge fuse` and convert the fused model instead)", dir)
	}
	for _, key := range ad.Extra {
		if strings.HasSuffix(key, ".base_layer.weight") {
			// the base's own weight, which PEFT saves beside an embedding LoRA (save_embedding_layers); llama.cpp
			// takes it from the base model, as llama.cpp's converter does
			res.Skipped = append(res.Skipped, key)
			continue
		}
		if !slices.Contains(opts.Drop, DropModulesToSave) {
			return nil, nil, errs.Value("%s: tensor %s is a full tensor (modules_to_save), which llama.cpp's LoRA adapters cannot "+
				"carry; fuse it into the base (`gomerge fuse`), or pass drop=[\"modules_to_save\"] to leave it out "+
				"(the adapter then differs from PEFT's)", dir, key)
		}
		res.Dropped = append(res.Dropped, key+" (modules_to_save)")
	}
	var jobs []job
	var tensors []TensorInfo
	for _, name := range ad.Order {
		m := ad.Modules[name]
		if m.Magnitude.Shape != nil {
			return nil, nil, errs.Value("%s: module %s has a DoRA magnitude vector; llama.cpp's LoRA adapters cannot carry DoRA", dir, name)
		}
		if m.Param != "" {
			return nil, nil, errs.Value("%s: module %s adapts the expert parameter %s (target_parameters); gomerge does not "+
				"export expert LoRA to GGUF yet (fuse the adapter into the base with `gomerge fuse` and convert the fused "+
				"model instead)", dir, name, m.Param)
		}
		if m.RawA.Shape == nil { // only a bias (or magnitude): nothing LoRA
			continue
		}
		if m.Bias.Shape != nil {
			if !slices.Contains(opts.Drop, DropLoraBias) {
				return nil, nil, errs.Value("%s: module %s has a LoRA bias (lora_bias), which llama.cpp's LoRA adapters cannot carry; "+
					"pass drop=[\"lora_bias\"] to leave the biases out (the adapter then differs from PEFT's)", dir, name)
			}
			res.Dropped = append(res.Dropped, name+".lora_B.bias (lora_bias)")
		}
		if m.Kind == adapter.KindConv {
			return nil, nil, errs.Value("%s: module %s is a convolution LoRA; llama.cpp applies LoRA to matrices only", dir, name)
		}
		tname, err := base.TensorName(name)
		if err != nil {
			return nil, nil, errs.Value("%s: %v", dir, err)
		}
		embed := tname == "token_embd.weight"
		switch {
		case tname == "output.weight" && base.Tied:
			if !slices.Contains(opts.Drop, DropLMHead) {
				return nil, nil, errs.Value("%s: module %s is a LoRA of lm_head, but the base's lm_head is tied to its embeddings "+
					"(tie_word_embeddings in %s; llama.cpp's %s GGUF never has an output tensor: %t), so llama.cpp has no "+
					"output tensor to apply it to; pass drop=[\"lm_head\"] to leave it out (the adapter then differs from PEFT's)",
					dir, name, base.Path, base.Arch.Name, base.Arch.NoOutput)
			}
			res.Dropped = append(res.Dropped, name+" (lm_head LoRA on a tied base)")
			continue
		case embed != (m.Kind == adapter.KindEmbedding):
			return nil, nil, errs.Value("%s: module %s: a LoRA of kind %s cannot be applied to %s", dir, name, kindName(m.Kind), tname)
		case embed && base.Arch.EmbeddingScaled:
			return nil, nil, errs.Value("%s: module %s: %s scales its embeddings inside the embedding module, so PEFT adds this "+
				"LoRA unscaled while llama.cpp scales it with the embeddings; it cannot be written exactly", dir, name, base.HFArch)
		}
		j := job{m: m, embed: embed, ggufName: tname}
		if base.Arch.PermuteQK {
			switch {
			case strings.HasSuffix(tname, ".attn_q.weight"):
				j.permute = base.Heads
			case strings.HasSuffix(tname, ".attn_k.weight"):
				j.permute = base.HeadsKV
			}
			if j.permute > 0 && m.Out()%(2*j.permute) != 0 {
				return nil, nil, errs.Value("%s: module %s has %d output rows, not a multiple of 2 x %d heads (%s): wrong base?",
					dir, name, m.Out(), j.permute, base.Path)
			}
		}
		r := m.Rank
		dimsA := []int{m.In(), r} // numpy (r, in)
		if embed {
			dimsA = []int{r, m.In()} // numpy (vocab, r): A transposed, as llama.cpp's build_inp_embd reads it
		}
		dimsB := []int{r, m.Out()} // numpy (out, r)
		j.a, j.b = len(tensors), len(tensors)+1
		for _, t := range []TensorInfo{{Name: tname + ".lora_a", Dims: dimsA}, {Name: tname + ".lora_b", Dims: dimsB}} {
			t.Type = outType
			if outType == TypeQ8_0 && t.Dims[0]%q8Block != 0 { // as llama.cpp's converter: f16 where Q8_0 cannot go
				t.Type = TypeF16
				res.F16Fallback = append(res.F16Fallback, t.Name)
			}
			tensors = append(tensors, t)
		}
		jobs = append(jobs, j)
		res.Ranks[fmt.Sprint(r)]++
	}
	if len(jobs) == 0 {
		return nil, nil, errs.Value("%s: nothing to export: every module was left out", dir)
	}
	return jobs, tensors, nil
}

func kindName(k adapter.ModuleKind) string {
	return map[adapter.ModuleKind]string{adapter.KindLinear: "Linear", adapter.KindEmbedding: "Embedding", adapter.KindConv: "Conv"}[k]
}

// write writes the file: the header, then each module's two tensors at
// their offsets, modules in parallel, and syncs it.
func write(ctx context.Context, path string, header []byte, dataSize int64, jobs []job, tensors []TensorInfo,
	workers int, progress *parallel.Progress) error {
	f, err := os.Create(path)
	if err != nil {
		return errs.IO(path, err)
	}
	start := int64(len(header))
	_, err = f.Write(header)
	if err == nil {
		err = f.Truncate(start + dataSize)
	}
	if err != nil {
		return errs.SyncClose(f, path, err)
	}
	err = parallel.RunJobs(ctx, len(jobs), workers, progress, func(_, i int) error {
		j := jobs[i]
		defer j.m.Release()
		a, b, err := factors(j)
		if err != nil {
			return err
		}
		for _, w := range []struct {
			t *TensorInfo
			x []float32
		}{{&tensors[j.a], a}, {&tensors[j.b], b}} {
			if _, err := f.WriteAt(encode(w.t.Type, w.x), start+w.t.Offset); err != nil {
				return errs.IO(path, err)
			}
		}
		return nil
	})
	return errs.SyncClose(f, path, err)
}

// factors returns the module's A and B as llama.cpp reads them: B scaled by
// the module's PEFT scale (and its rows permuted for Wq/Wk), A transposed
// for the embeddings.
func factors(j job) (a, b []float32, err error) {
	ra, rb, err := j.m.Factors()
	if err != nil {
		return nil, nil, err
	}
	r, in, out := j.m.Rank, j.m.In(), j.m.Out()
	a = ra
	if j.embed {
		a = make([]float32, len(ra))
		for k := range r {
			for c := range in {
				a[c*r+k] = ra[k*in+c]
			}
		}
	}
	s := j.m.Scaling
	b = make([]float32, len(rb))
	for i, v := range rb {
		b[i] = float32(float64(v) * s)
	}
	if j.permute > 0 {
		p := make([]float32, len(b))
		if err := permuteRows(p, b, out, r, j.permute); err != nil {
			return nil, nil, errs.Value("module %s: %v", j.m.Name, err)
		}
		b = p
	}
	return a, b, nil
}

// encode converts values to a tensor type's bytes.
func encode(t GGMLType, x []float32) []byte {
	switch t {
	case TypeF16:
		return safetensors.Encode(safetensors.F16, x)
	case TypeBF16:
		return safetensors.Encode(safetensors.BF16, x)
	case TypeQ8_0:
		return quantizeQ8_0(make([]byte, 0, TypeQ8_0.bytes(len(x))), x)
	}
	return safetensors.Encode(safetensors.F32, x)
}
