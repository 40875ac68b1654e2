package extract

// Mixture-of-experts parameters: a fine-tune's changed expert tensors are
// extracted per expert into PEFT's target_parameters layout (adapter/params.go),
// the parameter named as the model holds it in memory, whatever its layout on
// disk (modelfolder.ExpertLayouts, as transformers' conversion mapping).

import (
	"fmt"
	"math"
	"math/rand/v2"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/linalg"
	"gomerge/gomerge/methods"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/safetensors"
)

// expertJob is an extraction job's expert parameter: its path in memory,
// its module's key in the adapter (through base_layer when nested), and
// where each expert's update is on disk.
type expertJob struct {
	param      string
	key        string
	target     string     // its target_parameters entry (the path after the layer index)
	experts    int        // E
	pieces     [][]string // per expert, the tensors stacked along the output dimension (per-expert layouts)
	fused      string     // or the one [E, ...] tensor
	transposed bool       // the fused tensor is [E, in, out]
}

var perExpertName = regexp.MustCompile(`^(.*\.experts)\.(\d+)\.([A-Za-z0-9_]+)\.weight$`)

// planExperts groups the expert tensors of the base into parameter jobs
// and returns them with the names they take.
func planExperts(base *modelfolder.Folder) ([]extractJob, map[string]bool) {
	taken := map[string]bool{}
	type group struct {
		module, disk, pname string
		layout              modelfolder.ExpertLayout
		experts             int
	}
	groups := map[string]*group{}
	var order []string
	for _, name := range base.Names() {
		mm := perExpertName.FindStringSubmatch(name)
		if mm == nil {
			continue
		}
		disk, piece := mm[1], mm[3]
		e, _ := strconv.Atoi(mm[2])
		for _, l := range modelfolder.ExpertLayoutsFor(base.ModelType()) {
			module := disk
			if l.Rename[1] != "" {
				if !strings.Contains(disk, l.Rename[1]) {
					continue
				}
				module = strings.Replace(disk, l.Rename[1], l.Rename[0], 1)
			}
			for pname, pieces := range l.Pieces {
				if !slices.Contains(pieces, piece) {
					continue
				}
				k := disk + "|" + pname
				g := groups[k]
				if g == nil {
					g = &group{module: module, disk: disk, pname: pname, layout: l}
					groups[k] = g
					order = append(order, k)
				}
				g.experts = max(g.experts, e+1)
			}
		}
	}
	var jobs []extractJob
	for _, k := range order {
		g := groups[k]
		pieces := g.layout.Pieces[g.pname]
		x := &expertJob{param: g.module + "." + g.pname, experts: g.experts}
		complete := true
		for e := range g.experts {
			var names []string
			for _, p := range pieces {
				n := fmt.Sprintf("%s.%d.%s.weight", g.disk, e, p)
				if _, ok := base.Info(n); !ok {
					complete = false
				}
				names = append(names, n)
			}
			x.pieces = append(x.pieces, names)
		}
		if !complete { // not this layout: the tensors stay ordinary modules
			continue
		}
		jobs = append(jobs, expertExtractJob(x, base))
		for _, names := range x.pieces {
			for _, n := range names {
				taken[n] = true
			}
		}
	}
	transposed := slices.Contains(modelfolder.TransposedExperts, base.ModelType())
	for _, name := range base.Names() {
		info, _ := base.Info(name)
		last := name[strings.LastIndex(name, ".")+1:]
		if len(info.Shape) != 3 || !strings.Contains(name, ".experts.") || !slices.Contains(adapter.ParamOrder, last) {
			continue
		}
		x := &expertJob{param: name, experts: info.Shape[0], fused: name, transposed: transposed}
		jobs = append(jobs, expertExtractJob(x, base))
		taken[name] = true
	}
	nestExperts(jobs)
	return jobs, taken
}

// expertExtractJob sizes a parameter job: dW of each expert is m x n (out x in).
func expertExtractJob(x *expertJob, base *modelfolder.Folder) extractJob {
	j := extractJob{module: x.param, lora: true, expert: x}
	if x.fused != "" {
		info, _ := base.Info(x.fused)
		j.tensors = []string{x.fused}
		j.m, j.n = info.Shape[1], info.Shape[2]
		if x.transposed {
			j.m, j.n = j.n, j.m
		}
		return j
	}
	for _, n := range x.pieces[0] {
		info, _ := base.Info(n)
		j.m += info.Shape[0]
		j.n = info.Shape[1]
	}
	for _, names := range x.pieces {
		j.tensors = append(j.tensors, names...)
	}
	return j
}

// nestExperts names each parameter's module as PEFT saves it: parameters
// of one module nest in registration order (adapter.ParamOrder), the first
// innermost, through base_layer; and gives each its target_parameters entry
// (the path after the layer index, or the whole path).
func nestExperts(jobs []extractJob) {
	byModule := map[string][]string{}
	for _, j := range jobs {
		module := j.expert.param[:strings.LastIndex(j.expert.param, ".")]
		byModule[module] = append(byModule[module], j.expert.param[len(module)+1:])
	}
	for i := range jobs {
		x := jobs[i].expert
		module, pname := x.param[:strings.LastIndex(x.param, ".")], x.param[strings.LastIndex(x.param, ".")+1:]
		names := byModule[module]
		slices.SortFunc(names, func(a, b string) int {
			return slices.Index(adapter.ParamOrder, a) - slices.Index(adapter.ParamOrder, b)
		})
		depth := len(names) - 1 - slices.Index(names, pname)
		x.key = module + strings.Repeat(".base_layer", depth)
		x.target = x.param
		parts := strings.Split(x.param, ".")
		for k, p := range parts {
			if _, err := strconv.Atoi(p); err == nil && k+1 < len(parts) {
				x.target = strings.Join(parts[k+1:], ".")
				break
			}
		}
	}
}

// expertUpdate reads expert e's dW (m x n, out x in) into d and returns its
// squared Frobenius norm.
func expertUpdate(j *extractJob, e int, base, ft *modelfolder.Folder, d []float32) (float64, error) {
	x := j.expert
	total := 0.0
	if x.fused != "" {
		wb, wf, err := readPair(x.fused, base, ft)
		if err != nil {
			return 0, err
		}
		defer pool.Put(wb)
		defer pool.Put(wf)
		size := j.m * j.n
		for i := range size {
			v := wf[e*size+i] - wb[e*size+i]
			if x.transposed { // stored n x m (in x out)
				r, c := i/j.m, i%j.m
				d[c*j.n+r] = v
			} else {
				d[i] = v
			}
			total += float64(v) * float64(v)
		}
		return total, nil
	}
	row := 0
	for _, name := range x.pieces[e] {
		wb, wf, err := readPair(name, base, ft)
		if err != nil {
			return 0, err
		}
		for i, v := range wb {
			dv := wf[i] - v
			d[row*j.n+i] = dv
			total += float64(dv) * float64(dv)
		}
		row += len(wb) / j.n
		pool.Put(wb)
		pool.Put(wf)
	}
	return total, nil
}

// extractExperts factorises each expert's dW (its own random stream,
// "<param>[e]") and stacks the factors in PEFT's layout at the largest
// expert rank (at least 1), lower ranks padded with zeros.
func extractExperts(j *extractJob, base, ft *modelfolder.Folder, rule linalg.RankRule, dt safetensors.DType, seed uint64) (extractOutcome, error) {
	var o extractOutcome
	x := j.expert
	as, bs, ranks := make([][]float32, x.experts), make([][]float32, x.experts), make([]int, x.experts)
	d := pool.Get(j.m * j.n)
	defer pool.Put(d)
	total, rest := 0.0, 0.0
	for e := range x.experts {
		t, err := expertUpdate(j, e, base, ft, d)
		if err != nil {
			return o, err
		}
		if t == 0 {
			continue
		}
		label := fmt.Sprintf("%s[%d]", x.param, e)
		bk, ak, r, relErr := factorizeDense(d, j.m, j.n, t, rule, func() *rand.Rand { return methods.TensorRNG(seed, label, "extract") })
		as[e], bs[e], ranks[e] = methods.ToFloat32(ak), methods.ToFloat32(bk), r
		total += t
		rest += relErr * relErr * t
	}
	o.changed = total > 0
	r := max(slices.Max(ranks), 1)
	for e := range x.experts {
		if as[e] == nil {
			as[e], bs[e] = []float32{}, []float32{}
		}
	}
	a, b := make([]float32, r*x.experts*j.n), make([]float32, j.m*r*x.experts)
	adapter.StackExperts(as, bs, ranks, j.n, j.m, r, a, b)
	o.rank = r
	if total > 0 {
		o.relErr = math.Sqrt(rest / total)
	}
	aName, bName := adapter.ModuleKeys(x.key, adapter.KindLinear)
	encode := func(f []float32) []byte {
		if dt == safetensors.F32 {
			return safetensors.Float32AsBytes(f)
		}
		return safetensors.Encode(dt, f)
	}
	o.tensors = []safetensors.OutTensor{{Name: aName, DType: dt, Shape: []int{r * x.experts, j.n}}, {Name: bName, DType: dt, Shape: []int{j.m, r * x.experts}}}
	o.data = [][]byte{encode(a), encode(b)}
	return o, nil
}
