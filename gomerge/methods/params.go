package methods

import (
	"fmt"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/linalg"
	"math"
	"reflect"
	"strings"
)

// Param is one entry of the parameter schema: a combination argument of
// the merge methods (a field of Combine, by its JSON name), with its type,
// its default as the engine applies it, its check and a one-line doc. The
// schema drives every surface: Validate, the model card, the bindings'
// EngineParams, and through them the Python API, the command line's flags
// and the recipes' keys. A new parameter is one entry here and its field in
// Combine.
type Param struct {
	Name string `json:"name"`
	// Type is "int", "float", "bool", "str" or "rank" (an int, or the
	// energy rule "energy:F").
	Type string `json:"type"`
	// Default is the value the engine uses when the parameter is not given;
	// nil where there is none (a rule of the method, which Doc gives).
	Default any      `json:"default"`
	Choices []string `json:"choices"`
	Min     *float64 `json:"min"` // the range the check enforces, for the docs (nil: open)
	Max     *float64 `json:"max"`
	// PEFT reports whether PEFT's add_weighted_adapter has the parameter in
	// its signature; where PEFT gives it a default, that default is not a
	// setting (PEFT's callers pass it along to every method).
	PEFT bool   `json:"peft"`
	Doc  string `json:"doc"`

	// check checks the value v (nil when not given) for c, whose method
	// takes the parameter and is resolved.
	check func(v any, c *Combine) error
	field []int // the index of the field of Combine
}

func bound(v float64) *float64 { return &v }

// params is the parameter schema, in the order of the docs and the flags.
var params = []Param{
	{Name: "svd_rank", Type: "rank", PEFT: true, Min: bound(1), check: checkSVDRank,
		Doc: "rank of the merged adapter for the methods that end in a factorisation (default: the largest input " +
			"rank; the sum of ranks for task_arithmetic; the merged update's rank for the span methods), or the " +
			"energy rule energy:F: per module, the smallest rank keeping the fraction F of the update's squared norm"},
	{Name: "max_rank", Type: "int", Min: bound(1), check: checkMaxRank,
		Doc: "cap of every module's rank (for the energy rule, the span methods, or below a fixed svd_rank)"},
	{Name: "svd_clamp", Type: "float", PEFT: true, Min: bound(0), Max: bound(1), check: checkSVDClamp,
		Doc: "clamp the factors to the range of this quantile of their values, in [0, 1]"},
	{Name: "svd_full_matrices", Type: "bool", Default: true, PEFT: true,
		Doc: "accepted for compatibility with PEFT; the result does not depend on it"},
	{Name: "svd_driver", Type: "str", PEFT: true, Choices: []string{"gesvd", "gesvdj", "gesvda"}, check: checkSVDDriver,
		Doc: "accepted for compatibility with PEFT (a CUDA option there)"},
	{Name: "density", Type: "float", PEFT: true, Min: bound(0), Max: bound(1), check: checkDensity,
		Doc: "fraction of values kept by the pruning methods, in [0, 1]; required by them"},
	{Name: "majority_sign_method", Type: "str", Default: "total", PEFT: true, Choices: []string{"total", "frequency"},
		check: checkSignMethod, Doc: "TIES's sign election: by the total of the values, or by the frequency of the signs"},
	{Name: "seed", Type: "int", Min: bound(0),
		Doc: "seed of the random masks (default: a fresh one, reported in the result); the same seed gives the same bytes"},
	{Name: "lambda", Type: "float", Default: DefaultLambda, check: finiteParam("lambda"),
		Doc: "scale of the merged update (task_arithmetic, breadcrumbs*, della*)"},
	{Name: "gamma", Type: "float", Default: DefaultGamma, Min: bound(0), Max: bound(1), check: checkGamma,
		Doc: "breadcrumbs: fraction of each update's largest magnitudes dropped as outliers, in [0, 1]"},
	{Name: "epsilon", Type: "float", Default: DefaultEpsilon, Min: bound(0), check: checkEpsilon,
		Doc: "della: keep-probabilities from density - epsilon to density + epsilon by magnitude rank, in (0, 1)"},
	{Name: "scaling", Type: "float", Default: DefaultScaling, check: finiteParam("scaling"),
		Doc: "span methods (iso_c, tsv, core_*, knots_*): scale of the merged update"},
	{Name: "common_fraction", Type: "float", Default: DefaultCommonFraction, Min: bound(0), Max: bound(1),
		check: checkCommonFraction, Doc: "iso_cts: share of the common subspace, in [0, 1]"},
}

// The schema and Combine must agree: every parameter is a field (by its
// JSON name) and every field but combination_type a parameter.
func init() {
	t := reflect.TypeFor[Combine]()
	fields := map[string][]int{}
	for i := range t.NumField() {
		f := t.Field(i)
		if tag, _, _ := strings.Cut(f.Tag.Get("json"), ","); f.IsExported() && tag != "" && tag != "combination_type" {
			fields[tag] = f.Index
		}
	}
	for i := range params {
		idx, ok := fields[params[i].Name]
		if !ok {
			panic("gomerge: parameter " + params[i].Name + " has no field in Combine")
		}
		params[i].field = idx
		delete(fields, params[i].Name)
	}
	for name := range fields {
		panic("gomerge: field " + name + " of Combine has no entry in the parameter schema")
	}
}

// Params returns the parameter schema.
func Params() []Param { return append([]Param(nil), params...) }

// LookupParam returns the schema entry of a parameter.
func LookupParam(name string) (Param, bool) {
	for _, p := range params {
		if p.Name == name {
			return p, true
		}
	}
	return Param{}, false
}

// value is the parameter's value in c: the field's value (dereferenced),
// or nil when it was not given.
func (p *Param) value(c *Combine) any {
	v := reflect.ValueOf(c).Elem().FieldByIndex(p.field)
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			return nil
		}
		return v.Elem().Interface()
	case reflect.String:
		if v.String() == "" {
			return nil
		}
	}
	return v.Interface()
}

// given reports whether the parameter is set in c: given, and for the
// parameters to which PEFT's signature gives a default, given another value.
func (p *Param) given(c *Combine) bool {
	v := p.value(c)
	return v != nil && !(p.PEFT && p.Default != nil && v == p.Default)
}

// valueOrDefault is the value the merge uses: the given one or the default.
func (p *Param) valueOrDefault(c *Combine) any {
	if v := p.value(c); v != nil {
		return v
	}
	return p.Default
}

// checkParams refuses the parameters the method does not take and checks
// those it takes, in the schema's order.
func (o *Combine) checkParams() error {
	m := o.method
	for i := range params {
		p := &params[i]
		if p.given(o) && !m.takes(p.Name) {
			takes := "none of them"
			if len(m.Params) > 0 {
				takes = strings.Join(m.Params, ", ")
			}
			return errs.Value("%s: combination_type %q does not take %s (it takes: %s)", p.Name, m.Name, p.Name, takes)
		}
	}
	for i := range params {
		p := &params[i]
		if p.check != nil && m.takes(p.Name) {
			if err := p.check(p.value(o), o); err != nil {
				return err
			}
		}
	}
	return nil
}

// The checks of the schema's entries: each names its parameter.

func checkSVDRank(v any, c *Combine) error {
	if v == nil {
		return nil
	}
	r := v.(linalg.RankSpec)
	if r.Energy == 0 && r.Fixed <= 0 {
		return errs.Value("svd_rank: must be a positive integer, an energy rule such as \"energy:0.99\", or None, got %d", r.Fixed)
	}
	// the methods that take svd_rank factorise their result: exactly (svd, task_arithmetic, the span methods), or
	// a pruned dense update by a randomized SVD, which has no exact spectrum for the energy rule
	if r.Energy > 0 && !c.method.Rank.exact {
		return errs.Value("svd_rank: the energy rule needs the exact spectrum, and combination_type %q factorises a pruned "+
			"dense update by a randomized SVD: give an integer svd_rank", c.CombinationType)
	}
	return nil
}

func checkMaxRank(v any, _ *Combine) error {
	if v != nil && v.(int) <= 0 {
		return errs.Value("max_rank: must be a positive integer or None, got %d", v)
	}
	return nil
}

func checkSVDClamp(v any, _ *Combine) error {
	if q, ok := v.(float64); ok && (q < 0 || q > 1 || math.IsNaN(q)) {
		return errs.Value("svd_clamp: must be a quantile in [0, 1] or None, got %v", q)
	}
	return nil
}

func checkSVDDriver(v any, _ *Combine) error {
	switch v {
	case nil, "gesvd", "gesvdj", "gesvda":
		return nil
	}
	return errs.Value("svd_driver: invalid value %q (expected None, 'gesvd', 'gesvdj' or 'gesvda')", v)
}

func checkDensity(v any, c *Combine) error {
	if v == nil && c.method.NeedsDensity() {
		return errs.Value("density: combination_type %q needs a density (the fraction of values kept, in [0, 1])", c.CombinationType)
	}
	d, ok := v.(float64)
	if !ok {
		return nil
	}
	if math.IsNaN(d) || d < 0 || d > 1 {
		return errs.Value("density: must be in [0, 1], got %v", d)
	}
	if d == 0 && c.method.Pruning == PruneDARE {
		return errs.Value("density: %q rescales kept values by 1/density and needs density > 0", c.CombinationType)
	}
	return nil
}

func checkSignMethod(v any, _ *Combine) error {
	switch v {
	case nil, "total", "frequency":
		return nil
	}
	return errs.Value("majority_sign_method: invalid value %q (expected 'total' or 'frequency')", v)
}

// finiteParam refuses NaN and infinities.
func finiteParam(name string) func(v any, _ *Combine) error {
	return func(v any, _ *Combine) error {
		if x, ok := v.(float64); ok && (math.IsNaN(x) || math.IsInf(x, 0)) {
			return errs.Value("%s: %v is not a finite number", name, x)
		}
		return nil
	}
}

func checkGamma(v any, _ *Combine) error {
	if g, ok := v.(float64); ok && (math.IsNaN(g) || g < 0 || g > 1) {
		return errs.Value("gamma: the fraction of largest magnitudes dropped must be in [0, 1], got %v", g)
	}
	return nil
}

// checkEpsilon checks epsilon, and with density (DELLA's keep-probabilities
// density +/- epsilon) whether given or not.
func checkEpsilon(v any, c *Combine) error {
	e, ok := v.(float64)
	if ok && (math.IsNaN(e) || math.IsInf(e, 0) || e < 0) {
		return errs.Value("epsilon: must be a number >= 0, got %v", e)
	}
	if !ok {
		e = DefaultEpsilon
	}
	if c.Density != nil {
		if d := *c.Density; d > 0 && d < 1 && (d-e <= 0 || d+e >= 1) {
			return errs.Value("epsilon: must be chosen such that density +/- epsilon is in (0, 1), got density %v "+
				"and epsilon %v", d, e)
		}
	}
	return nil
}

func checkCommonFraction(v any, _ *Combine) error {
	if f, ok := v.(float64); ok && (math.IsNaN(f) || f < 0 || f > 1) {
		return errs.Value("common_fraction: the share of the common subspace must be in [0, 1], got %v", f)
	}
	return nil
}

// CardLines lists, for the model card, each parameter the method takes
// (but the seed, which the card gives with how to reuse it) with the value
// the merge used: the given one, or the schema's default.
func (o *Combine) CardLines(m Method) []string {
	var lines []string
	for i := range params {
		p := &params[i]
		if p.Name == "seed" || !m.takes(p.Name) {
			continue
		}
		if v := p.valueOrDefault(o); v != nil {
			lines = append(lines, fmt.Sprintf("- %s: %v", p.Name, v))
		}
	}
	return lines
}
