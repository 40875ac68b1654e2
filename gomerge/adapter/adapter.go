package adapter

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/atomicdir"
	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/safetensors"
)

// ModuleKind is the kind of layer a LoRA module adapts.
type ModuleKind int

// Layer kinds, told apart by their tensor names and ranks.
const (
	KindLinear    ModuleKind = iota // lora_A.weight / lora_B.weight, 2-D
	KindEmbedding                   // lora_embedding_A / lora_embedding_B
	KindConv                        // lora_A.weight / lora_B.weight, 3-D to 5-D
)

// File names inside a PEFT adapter directory.
const (
	ConfigFile  = "adapter_config.json"
	WeightsFile = "adapter_model.safetensors"
	KeyPrefix   = "base_model.model."
)

// Module is one adapted layer of an adapter: lora_A with shape (r, ...) and
// lora_B with shape (out, r, 1...). In two dimensions A is r x In and B is
// Out x r, whatever the layer kind.
type Module struct {
	Name    string // module path without "base_model.model."
	Kind    ModuleKind
	RawA    safetensors.RawTensor
	RawB    safetensors.RawTensor
	Rank    int
	Alpha   float64
	Scaling float64
	// Magnitude (DoRA's lora_magnitude_vector) and Bias (lora_B.bias) are
	// only read when fusing into a base model; their Shape is nil when absent.
	Magnitude safetensors.RawTensor
	Bias      safetensors.RawTensor
	// Param is the path of the nn.Parameter the module adapts (PEFT's
	// target_parameters; "" for a module), and Experts its number of
	// experts: then Rank is the rank per expert, and A and B hold
	// Rank*Experts rows and columns (params.go).
	Param   string
	Experts int
	// factors read from a file, kept until release (joint: one buffer holding both)
	a, b, joint []float32
}

// In is the number of columns of A in two dimensions.
func (m *Module) In() int { return safetensors.Numel(m.RawA.Shape[1:]) }

// Out is the number of rows of B.
func (m *Module) Out() int { return m.RawB.Shape[0] }

// Factors returns A (r x In) and B (Out x r) as float32, to be treated as
// read-only: views of memory for F32 tensors in memory, otherwise read from
// the file (once) and converted. A read error names the file and tensor.
func (m *Module) Factors() (a, b []float32, err error) {
	if m.a == nil {
		ab, na, ok, err := readAdjacent(m.RawA, m.RawB)
		switch {
		case err != nil:
			return nil, nil, err
		case ok:
			m.a, m.b, m.joint = ab[:na:na], ab[na:], ab
		default:
			fa, err := View(m.RawA)
			if err != nil {
				return nil, nil, err
			}
			fb, err := View(m.RawB)
			if err != nil {
				if m.RawA.File() != nil {
					pool.Put(fa)
				}
				return nil, nil, err
			}
			m.a, m.b = fa, fb
		}
	}
	return m.a, m.b, nil
}

// Release gives the buffers of factors read from a file back to the pool
// (a module is merged by one goroutine, once).
func (m *Module) Release() {
	switch {
	case m.joint != nil:
		pool.Put(m.joint)
	case m.RawA.File() != nil && m.a != nil:
		pool.Put(m.a)
		pool.Put(m.b)
	}
	m.a, m.b, m.joint = nil, nil, nil
}

// readAdjacent reads A and B with one read when they are float32 tensors
// stored one after the other in the same file (as PEFT writes them: sorted
// by name), returning both in one buffer and A's length.
func readAdjacent(a, b safetensors.RawTensor) (ab []float32, na int, ok bool, err error) {
	f := a.File()
	if f == nil || f != b.File() {
		return nil, 0, false, nil
	}
	ea, eb := f.Entries[a.Name()], f.Entries[b.Name()]
	if ea.DType != safetensors.F32 || eb.DType != safetensors.F32 || ea.Offset+ea.Length != eb.Offset {
		return nil, 0, false, nil
	}
	na = int(ea.Length / 4)
	ab = pool.Get(na + int(eb.Length/4))
	if err := f.ReadFloat32Run(ab, ea.Offset, na, a.Name(), b.Name()); err != nil {
		pool.Put(ab)
		return nil, 0, false, err
	}
	return ab, na, true, nil
}

// View returns a tensor as float32: read from its file into a pooled
// buffer, or a view (F32) or conversion of memory.
func View(t safetensors.RawTensor) ([]float32, error) {
	if f := t.File(); f != nil {
		return f.ReadFloat32Into(pool.Get(safetensors.Numel(t.Shape)), t.Name())
	}
	if t.DType == safetensors.F32 {
		return safetensors.BytesAsFloat32(t.Data), nil
	}
	return safetensors.Decode(t.DType, t.Data), nil
}

// Keys returns the safetensors names of A and B for this module.
func (m *Module) Keys() (string, string) { return ModuleKeys(m.Name, m.Kind) }

// ModuleKeys returns the safetensors names of A and B for module name of kind.
func ModuleKeys(name string, kind ModuleKind) (string, string) {
	if kind == KindEmbedding {
		return KeyPrefix + name + ".lora_embedding_A", KeyPrefix + name + ".lora_embedding_B"
	}
	return KeyPrefix + name + ".lora_A.weight", KeyPrefix + name + ".lora_B.weight"
}

// Adapter is a loaded PEFT LoRA adapter directory.
type Adapter struct {
	Dir     string
	Config  *Config
	Modules map[string]*Module
	Order   []string          // module names, sorted
	Extra   []string          // tensors that are not LoRA factors (kept out of merges)
	DType   safetensors.DType // dtype of the first module's lora_A
	File    *safetensors.File // the open weights file
	forFuse bool              // DoRA magnitudes and LoRA biases are kept (see LoadAll)
}

// Close releases the adapter's weights file.
func (a *Adapter) Close() error {
	if a.File == nil {
		return nil
	}
	return a.File.Close()
}

// Load reads and validates a PEFT LoRA adapter directory for a merge.
func Load(dir string) (*Adapter, error) { return load(dir, false) }

// LoadAll reads the adapter directories in parallel, for a merge or, with
// forFuse, for a fuse into the base model (DoRA magnitude vectors and LoRA
// biases accepted: a fuse applies them, a merge cannot). The first error in
// argument order wins, and every adapter read is closed.
func LoadAll(dirs []string, forFuse bool) ([]*Adapter, error) {
	adapters := make([]*Adapter, len(dirs))
	errors := make([]error, len(dirs))
	parallel.For(len(dirs), 1, func(lo, hi int) {
		for i := lo; i < hi; i++ {
			adapters[i], errors[i] = load(dirs[i], forFuse)
		}
	})
	for _, err := range errors {
		if err != nil {
			for _, a := range adapters {
				if a != nil {
					a.Close()
				}
			}
			return nil, err
		}
	}
	return adapters, nil
}

// load reads an adapter directory (LoadAll).
func load(dir string, forFuse bool) (*Adapter, error) {
	st, err := os.Stat(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, errs.New(errs.KindFileNotFound, "adapter directory %s does not exist", dir)
		}
		return nil, errs.IO(dir, err)
	}
	if !st.IsDir() {
		return nil, errs.Value("%s is not a directory; pass a PEFT adapter directory (with %s and %s)", dir, ConfigFile, WeightsFile)
	}
	var cfg *Config
	if forFuse {
		cfg, err = readConfigForFuse(filepath.Join(dir, ConfigFile))
	} else {
		cfg, err = ReadConfig(filepath.Join(dir, ConfigFile))
	}
	if err != nil {
		if errs.KindOf(err) == errs.KindFileNotFound {
			if subs := adapterSubdirs(dir); len(subs) > 0 {
				// PEFT saves adapters not named "default" into <dir>/<name>/
				return nil, errs.New(errs.KindFileNotFound, "%s has no %s, but these subfolders are adapters: %s "+
					"(PEFT saves an adapter named other than \"default\" into <dir>/<name>/)", dir, ConfigFile, strings.Join(subs, ", "))
			}
		}
		return nil, err
	}
	wpath := filepath.Join(dir, WeightsFile)
	if _, err := os.Stat(wpath); errors.Is(err, fs.ErrNotExist) {
		if _, err2 := os.Stat(filepath.Join(dir, "adapter_model.bin")); err2 == nil {
			return nil, errs.Value("%s: only adapter_model.bin found; gomerge reads %s (re-save the adapter with safe_serialization=True)", dir, WeightsFile)
		}
		return nil, errs.New(errs.KindFileNotFound, "%s: no such file", wpath)
	}
	file, err := safetensors.Open(wpath)
	if err != nil {
		return nil, err
	}
	a := &Adapter{Dir: dir, Config: cfg, Modules: map[string]*Module{}, File: file, forFuse: forFuse}
	if err := a.index(wpath, file); err != nil {
		file.Close()
		return nil, err
	}
	sort.Strings(a.Order)
	sort.Strings(a.Extra)
	a.DType = a.Modules[a.Order[0]].RawA.DType
	return a, nil
}

func (a *Adapter) index(wpath string, st *safetensors.File) error {
	for key, e := range st.Entries {
		t := st.Tensor(key)
		if err := a.addTensor(wpath, key, t, e.RawDType); err != nil {
			return err
		}
	}
	for name := range a.Modules {
		a.Order = append(a.Order, name)
	}
	sort.Strings(a.Order) // errors name the first module in order
	for _, name := range a.Order {
		if err := a.finishModule(wpath, name, a.Modules[name]); err != nil {
			return err
		}
	}
	if len(a.Modules) == 0 {
		return errs.Value("%s: no LoRA tensors (lora_A / lora_B) found", wpath)
	}
	return a.checkTargets(wpath)
}

// checkTargets refuses weights of which no module matches the config's
// target_modules (PEFT's rule: a list entry matches a module path equal to
// it or ending in "."+entry; a string is a full-match regex).
func (a *Adapter) checkTargets(wpath string) error {
	tm := a.Config.TargetModules
	if !tm.IsRegex && len(tm.Names) == 0 {
		return nil // nothing declared (PEFT's defaults for known models): nothing to check
	}
	var re *regexp.Regexp
	if tm.IsRegex {
		var err error
		if re, err = regexp.Compile(`^(?:` + tm.Regex + `)$`); err != nil {
			return nil // a Python-only regex: PEFT checks it, gomerge cannot
		}
	}
	for name := range a.Modules {
		if re != nil && re.MatchString(name) {
			return nil
		}
		for _, t := range tm.Names {
			if name == t || strings.HasSuffix(name, "."+t) {
				return nil
			}
		}
	}
	return errs.Value("%s: target_modules %v in %s matches none of the %d modules in %s (first: %s)",
		a.Dir, targetsText(tm), ConfigFile, len(a.Modules), filepath.Base(wpath), a.Order[0])
}

func targetsText(tm TargetModules) string {
	if tm.IsRegex {
		return fmt.Sprintf("%q", tm.Regex)
	}
	return fmt.Sprintf("%q", tm.Names)
}

// adapterSubdirs lists the subfolders of dir that hold an adapter config.
func adapterSubdirs(dir string) []string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		if e.IsDir() {
			if _, err := os.Stat(filepath.Join(dir, e.Name(), ConfigFile)); err == nil {
				out = append(out, filepath.Join(dir, e.Name()))
			}
		}
	}
	return out
}

var factorSuffixes = []struct {
	suffix string
	kind   ModuleKind
	isA    bool
}{
	{".lora_A.weight", KindLinear, true},
	{".lora_B.weight", KindLinear, false},
	{".lora_embedding_A", KindEmbedding, true},
	{".lora_embedding_B", KindEmbedding, false},
}

func (a *Adapter) addTensor(path, key string, t safetensors.RawTensor, rawDType string) error {
	name := strings.TrimPrefix(key, KeyPrefix)
	if a.forFuse {
		for _, s := range []struct {
			suffix    string
			magnitude bool
		}{{".lora_magnitude_vector", true}, {".lora_B.bias", false}} {
			if mod, ok := strings.CutSuffix(name, s.suffix); ok {
				if t.DType == "" {
					return errs.Value("%s: tensor %s has dtype %s, which gomerge does not read (supported: F32, BF16, F16)", path, key, rawDType)
				}
				m := a.Modules[mod]
				if m == nil {
					m = &Module{Name: mod, Kind: KindLinear}
					a.Modules[mod] = m
				}
				if s.magnitude {
					m.Magnitude = t
				} else {
					m.Bias = t
				}
				return nil
			}
		}
	}
	switch {
	case strings.HasSuffix(key, ".lora_magnitude_vector") || strings.Contains(key, ".lora_magnitude_vector."):
		return errs.Value("%s: tensor %s is a DoRA magnitude vector; DoRA adapters are not supported", path, key)
	case strings.HasSuffix(key, ".lora_B.bias"):
		return errs.Value("%s: tensor %s is a LoRA bias; adapters with lora_bias are not supported", path, key)
	}
	for _, s := range factorSuffixes {
		if !strings.HasSuffix(name, s.suffix) {
			continue
		}
		mod := strings.TrimSuffix(name, s.suffix)
		if t.DType == "" {
			return errs.Value("%s: tensor %s has dtype %s, which gomerge does not merge (supported: F32, BF16, F16)", path, key, rawDType)
		}
		m := a.Modules[mod]
		if m == nil {
			m = &Module{Name: mod, Kind: s.kind}
			a.Modules[mod] = m
		} else if m.RawA.Shape == nil && m.RawB.Shape == nil {
			m.Kind = s.kind // created by its magnitude or bias
		} else if (m.Kind == KindEmbedding) != (s.kind == KindEmbedding) {
			return errs.Value("%s: module %s has both lora_A/lora_B and lora_embedding tensors", path, mod)
		}
		if s.isA {
			m.RawA = t
		} else {
			m.RawB = t
		}
		return nil
	}
	a.Extra = append(a.Extra, key)
	return nil
}

func (a *Adapter) finishModule(path, name string, m *Module) error {
	aKey, bKey := m.Keys()
	if m.RawA.Shape == nil {
		return errs.Value("%s: tensor %s is missing (module %s has only lora_B)", path, aKey, name)
	}
	if m.RawB.Shape == nil {
		return errs.Value("%s: tensor %s is missing (module %s has only lora_A)", path, bKey, name)
	}
	sa, sb := m.RawA.Shape, m.RawB.Shape
	if len(sa) < 2 || len(sa) > 5 || len(sb) != len(sa) {
		return errs.Value("%s: tensors %s %v and %s %v do not have the shapes of LoRA factors", path, aKey, sa, bKey, sb)
	}
	if len(sa) > 2 {
		if m.Kind == KindEmbedding {
			return errs.Value("%s: embedding factor %s must be 2-D, got %v", path, aKey, sa)
		}
		m.Kind = KindConv
		for _, d := range sb[2:] {
			if d != 1 {
				return errs.Value("%s: tensor %s has shape %v; gomerge needs a 1x1 lora_B kernel", path, bKey, sb)
			}
		}
	}
	if sa[0] != sb[1] {
		return errs.Value("%s: module %s: lora_A %v and lora_B %v disagree on the rank (%d vs %d)", path, name, sa, sb, sa[0], sb[1])
	}
	for _, t := range []struct {
		key string
		raw safetensors.RawTensor
	}{{aKey, m.RawA}, {bKey, m.RawB}} {
		if int64(safetensors.Numel(t.raw.Shape)*t.raw.DType.Size()) != t.raw.ByteLen() {
			return errs.Value("%s: tensor %s: shape %v does not match its %d bytes", path, t.key, t.raw.Shape, t.raw.ByteLen())
		}
	}
	m.Rank = sa[0]
	param, err := a.Config.TargetedParam(path, name)
	if err != nil {
		return err
	}
	key := name
	if param != "" {
		key = param
	}
	r, alpha := a.Config.ModuleRankAlpha(key)
	switch {
	case param != "" && m.Kind != KindLinear:
		return errs.Value("%s: module %s adapts parameter %s but its factors %s %v are not 2-D", path, name, param, aKey, sa)
	case param != "" && m.Rank%r != 0:
		return errs.Value("%s: tensor %s (parameter %s) has %d rows, which is not a multiple of r=%d, the rank per expert "+
			"that %s gives it (PEFT stacks r rows per expert)", path, aKey, param, m.Rank, r, ConfigFile)
	case param != "":
		m.Param, m.Experts, m.Rank = param, m.Rank/r, r
	case r != m.Rank:
		return errs.Value("%s: module %s has rank %d but %s gives r=%d for it", path, name, m.Rank, ConfigFile, r)
	}
	m.Alpha = alpha
	m.Scaling = a.Config.Scaling(r, alpha)
	return nil
}

// outputKind is what an output adapter directory holds: overwrite replaces
// only a directory with an adapter_config.json (or an empty one), so that a
// mistyped path cannot replace unrelated data.
var outputKind = atomicdir.Kind{Marker: ConfigFile, What: "an adapter"}

// CheckOutput refuses an existing output directory unless overwrite is
// set, and with overwrite anything that is not a directory holding a PEFT
// adapter (or an empty directory); CreateOutput checks it too, this lets
// callers check before any work.
func CheckOutput(dir string, overwrite bool) error {
	return atomicdir.Check(dir, overwrite, outputKind)
}

// CreateOutput starts writing the adapter directory dir, by the engine's
// one output protocol (atomicdir.Output).
func CreateOutput(dir string, overwrite bool) (*atomicdir.Output, error) {
	return atomicdir.Create(dir, overwrite, outputKind)
}
