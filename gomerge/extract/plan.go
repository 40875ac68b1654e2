package extract

// The plan: the two folders checked against each other, and their tensors grouped into jobs.

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/safetensors"
)

// embeddingNames are the last parts of the names of embedding and output
// layers: 2-D weights that are not factorised (modules_to_save instead).
var embeddingNames = map[string]bool{
	"embed_tokens": true, "lm_head": true, "wte": true, "wpe": true, "word_embeddings": true,
	"position_embeddings": true, "token_type_embeddings": true, "embed_in": true, "embed_out": true,
	"embed_positions": true, "tok_embeddings": true, "shared": true, "embeddings": true,
}

// conv1DModels are the model types whose 2-D weights are GPT-2 Conv1D
// layers, stored in x out (PEFT's fan_in_fan_out).
var conv1DModels = map[string]bool{"gpt2": true}

// extractJob is one module of an extraction: a linear weight to factorise
// (lora), or the tensors of a module compared and maybe saved whole.
type extractJob struct {
	module  string   // module path, without ".weight"
	tensors []string // the module's tensors (lora: its weight only)
	lora    bool
	save    bool // save whole (modules_to_save) if changed, or always when named
	named   bool // named by SaveModules: saved even if unchanged
	m, n    int  // lora: dW is m x n (out x in)
	fanIn   bool // lora: the weight is stored in x out
	// expert: a mixture-of-experts parameter, extracted per expert
	// (experts.go); m x n is each expert's update
	expert *expertJob
}

// extractOutcome is what a job produced.
type extractOutcome struct {
	changed bool
	rank    int
	relErr  float64
	tensors []safetensors.OutTensor
	data    [][]byte
}

// tensorFile is the path of the shard that holds tensor name.
func tensorFile(f *modelfolder.Folder, name string) string {
	t, _ := f.Info(name)
	return filepath.Join(f.Dir, t.Shard)
}

// shapeText writes a shape as torch prints it: [256, 128].
func shapeText(shape []int) string {
	parts := make([]string, len(shape))
	for i, d := range shape {
		parts[i] = fmt.Sprint(d)
	}
	return "[" + strings.Join(parts, ", ") + "]"
}

// planExtraction checks that the two folders hold the same tensors with the
// same shapes and float dtypes, and groups the tensors into jobs: linear
// weights to factorise, and the other modules to compare.
func planExtraction(opts Options, base, ft *modelfolder.Folder) ([]extractJob, error) {
	for _, name := range base.Names() {
		if _, ok := ft.Info(name); !ok {
			return nil, errs.Value("tensor %s is in the base model (%s) but not in the fine-tuned model %s", name, tensorFile(base, name), opts.Finetuned)
		}
	}
	for _, name := range ft.Names() {
		if _, ok := base.Info(name); !ok {
			return nil, errs.Value("tensor %s is in the fine-tuned model (%s) but not in the base model %s", name, tensorFile(ft, name), opts.Base)
		}
	}
	modelType, _ := ft.Config()["model_type"].(string)
	conv1D := conv1DModels[modelType]
	saveNamed := func(module string) bool {
		last := module[strings.LastIndex(module, ".")+1:]
		for _, s := range opts.SaveModules {
			if s == module || s == last {
				return true
			}
		}
		return false
	}
	modules := map[string]*extractJob{}
	var order []string
	jobs, experts := planExperts(base)
	for _, name := range base.Names() {
		be, _ := base.Info(name)
		fe, _ := ft.Info(name)
		for _, c := range []struct {
			e modelfolder.TensorInfo
			f *modelfolder.Folder
		}{{be, base}, {fe, ft}} {
			if c.e.DType == "" {
				return nil, errs.Value("tensor %s in %s has dtype %s; only float tensors (F32, BF16, F16) can be compared",
					name, tensorFile(c.f, name), c.e.RawDType)
			}
		}
		if !slices.Equal(be.Shape, fe.Shape) {
			return nil, errs.Value("tensor %s has shape %s in the base model (%s) but %s in the fine-tuned model (%s)",
				name, shapeText(be.Shape), tensorFile(base, name), shapeText(fe.Shape), tensorFile(ft, name))
		}
		if experts[name] {
			continue
		}
		module, param := name, ""
		if i := strings.LastIndex(name, "."); i >= 0 {
			module, param = name[:i], name[i+1:]
		}
		last := module[strings.LastIndex(module, ".")+1:]
		named := saveNamed(module)
		if param == "weight" && len(be.Shape) == 2 && !embeddingNames[last] && !named {
			j := extractJob{module: module, tensors: []string{name}, lora: true, m: be.Shape[0], n: be.Shape[1]}
			if conv1D {
				j.m, j.n, j.fanIn = be.Shape[1], be.Shape[0], true
			}
			jobs = append(jobs, j)
			continue
		}
		j, ok := modules[module]
		if !ok {
			j = &extractJob{module: module, save: named || opts.SaveChanged, named: named}
			modules[module] = j
			order = append(order, module)
		}
		j.tensors = append(j.tensors, name)
	}
	for _, s := range opts.SaveModules {
		found := false
		for _, module := range order {
			if module == s || module[strings.LastIndex(module, ".")+1:] == s {
				found = true
				break
			}
		}
		if !found {
			return nil, errs.Value("save_modules: %q names no module of %s", s, opts.Finetuned)
		}
	}
	// a linear module whose bias were saved whole would be both a LoRA target and a module to save: a changed
	// bias of a factorised module is reported, not saved (a module named in SaveModules is never factorised)
	for _, j := range jobs {
		if other, ok := modules[j.module]; ok {
			other.save = false
		}
	}
	for _, module := range order {
		jobs = append(jobs, *modules[module])
	}
	return jobs, nil
}
