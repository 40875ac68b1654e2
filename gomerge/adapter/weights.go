package adapter

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"gomerge/gomerge/errs"
)

// Weight is one adapter's weight in a merge of adapter directories: one
// number for every module, or module-name patterns with their weights,
// resolved per module with PEFT's rank_pattern rule (CompilePattern: a
// pattern matches the end of the module name, after a dot; the first
// pattern that matches wins).
//
// In JSON it is a number; a list of numbers (a gradient for every module,
// the pattern ".*"); a list of {"pattern": P, "weight": W} entries in
// first-match order (a list, since a JSON object's order is lost in Go
// maps); or a string in the command line's form (ParseWeight). W is a
// number, or a list of numbers: a gradient, interpolated linearly over the
// module's layer index as mergekit's gradients are (Gradient). JSON has no
// NaN or infinity: a string such as "nan" or "-inf" where a number belongs
// is refused as not finite, by name. This is the one validator of the
// weight grammar: the Python package and its command line send what they
// are given.
type Weight struct {
	Value    float64
	Patterns []WeightPattern // nil: Value for every module; otherwise at least one entry
}

// WeightPattern is one pattern of a per-module weight.
type WeightPattern struct {
	Pattern string
	Weight  float64
	// Gradient, when not nil, replaces Weight: the values are spread evenly
	// over the layers, the first at layer 0 and the last at the merge's last
	// layer, and a module between two of them gets the linear interpolation.
	Gradient []float64
	re       *regexp.Regexp
}

// Compiled reports whether Weight.Compile has compiled the pattern.
func (p WeightPattern) Compiled() bool { return p.re != nil }

// Weights are the adapters' weights, one per adapter.
type Weights []Weight

// ScalarWeights returns one number per adapter as Weights.
func ScalarWeights(ws ...float64) Weights {
	out := make(Weights, len(ws))
	for i, w := range ws {
		out[i] = Weight{Value: w}
	}
	return out
}

// PerModule reports whether the weight depends on the module.
func (w Weight) PerModule() bool { return w.Patterns != nil }

// UnmarshalJSON decodes the weights array, naming the position of a weight
// that is neither a number nor a list of {"pattern", "weight"} entries.
func (ws *Weights) UnmarshalJSON(b []byte) error {
	if string(bytes.TrimSpace(b)) == "null" {
		*ws = nil
		return nil
	}
	var raw []json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return errs.New(errs.KindType, "weights: expected a list with one weight per adapter, got %s", clip(b))
	}
	out := make(Weights, len(raw))
	for i, r := range raw {
		if err := out[i].decode(r); err != nil {
			return errs.New(kindOf(err), "weights[%d]: %v", i, err)
		}
	}
	*ws = out
	return nil
}

// UnmarshalJSON decodes one weight.
func (w *Weight) UnmarshalJSON(b []byte) error {
	if err := w.decode(b); err != nil {
		return errs.New(kindOf(err), "weight: %v", err)
	}
	return nil
}

// CheckWeight decodes and checks the JSON weight of adapter i, as a merge
// request's weights are, without merging: the error names weights[i], the
// pattern and the problem. The command line and recipes call it to refuse a
// bad weight before they start.
func CheckWeight(i int, raw []byte) (Weight, error) {
	var w Weight
	if err := w.decode(raw); err != nil {
		return w, errs.New(kindOf(err), "weights[%d]: %v", i, err)
	}
	return w.Compile(i)
}

// kindOf is the kind of a decoding error: a TypeError unless the error
// says otherwise (a non-finite number or a bad command-line string is a
// ValueError).
func kindOf(err error) errs.ErrKind {
	var ge *errs.Error
	if errors.As(err, &ge) {
		return ge.Kind
	}
	return errs.KindType
}

func (w *Weight) decode(b []byte) error {
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		parsed, err := ParseWeight(s)
		if err != nil {
			return err
		}
		*w = parsed
		return nil
	}
	if len(b) == 0 || b[0] != '[' {
		v, err := decodeNumber(b)
		if errs.KindOf(err) == errs.KindValue {
			return err
		}
		if err != nil {
			return fmt.Errorf(`expected a number, a list of numbers (a gradient), a list of {"pattern": ..., "weight": ...} `+
				`entries or a string PATTERN=W[,PATTERN=W...], got %s`, clip(b))
		}
		*w = Weight{Value: v}
		return nil
	}
	var entries []json.RawMessage
	if err := json.Unmarshal(b, &entries); err != nil {
		return err
	}
	if len(entries) > 0 && !bytes.HasPrefix(bytes.TrimSpace(entries[0]), []byte("{")) { // a gradient for every module
		g, err := decodeGradient(entries)
		if err != nil {
			return err
		}
		*w = Weight{Patterns: []WeightPattern{{Pattern: ".*", Gradient: g}}}
		return nil
	}
	pats := make([]WeightPattern, 0, len(entries)) // non-nil even when empty: validate refuses it by name
	for k, e := range entries {
		var entry struct {
			Pattern *string         `json:"pattern"`
			Weight  json.RawMessage `json:"weight"`
		}
		dec := json.NewDecoder(bytes.NewReader(e))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&entry); err != nil || entry.Pattern == nil || entry.Weight == nil {
			return fmt.Errorf(`entry %d: expected {"pattern": <string>, "weight": <number or list of numbers>}, got %s`, k, clip(e))
		}
		p := WeightPattern{Pattern: *entry.Pattern}
		if slices.ContainsFunc(pats, func(q WeightPattern) bool { return q.Pattern == p.Pattern }) {
			return errs.Value("pattern '%s' is given twice", p.Pattern)
		}
		var err error
		if raw := bytes.TrimSpace(entry.Weight); len(raw) > 0 && raw[0] == '[' {
			var g []json.RawMessage
			if err := json.Unmarshal(raw, &g); err != nil {
				return fmt.Errorf("pattern '%s': %v", p.Pattern, err)
			}
			if p.Gradient, err = decodeGradient(g); err != nil {
				return errs.New(kindOf(err), "pattern '%s': %v", p.Pattern, err)
			}
		} else if p.Weight, err = decodeNumber(raw); errs.KindOf(err) == errs.KindValue {
			return errs.Value("pattern '%s': %v", p.Pattern, err)
		} else if err != nil {
			return fmt.Errorf("pattern '%s': the weight is not a number or a list of numbers: %s", p.Pattern, clip(raw))
		}
		pats = append(pats, p)
	}
	*w = Weight{Patterns: pats}
	return nil
}

// decodeGradient decodes the values of a gradient (non-nil, even when empty:
// Compile refuses an empty one by name).
func decodeGradient(values []json.RawMessage) ([]float64, error) {
	g := make([]float64, len(values))
	for n, x := range values {
		var err error
		if g[n], err = decodeNumber(x); errs.KindOf(err) == errs.KindValue {
			return nil, err
		} else if err != nil {
			return nil, fmt.Errorf("gradient value %d is not a number: %s", n, clip(x))
		}
	}
	return g, nil
}

// ParseWeight parses the command line's form of a weight: a number; a
// gradient A:B[:C...]; or PATTERN=W[,PATTERN=W...], the patterns in
// first-match order, W a number or a gradient. The weight follows a
// pattern's last "=", and a piece between commas that holds no "=" belongs
// to the pattern before it ("q{1,2}=1"). Errors are ValueErrors quoting the
// text.
func ParseWeight(text string) (Weight, error) {
	if !strings.Contains(text, "=") {
		v, g, err := parseValue(text)
		if err != nil {
			return Weight{}, err
		}
		if g != nil {
			return Weight{Patterns: []WeightPattern{{Pattern: ".*", Gradient: g}}}, nil
		}
		return Weight{Value: v}, nil
	}
	var entries []string
	for piece := range strings.SplitSeq(text, ",") {
		if n := len(entries); n > 0 && !strings.Contains(entries[n-1], "=") {
			entries[n-1] += "," + piece
		} else {
			entries = append(entries, piece)
		}
	}
	pats := make([]WeightPattern, 0, len(entries))
	for _, entry := range entries {
		eq := strings.LastIndex(entry, "=")
		if eq <= 0 {
			return Weight{}, errs.Value("'%s': expected PATTERN=W[,PATTERN=W...], got '%s'", text, entry)
		}
		p := WeightPattern{Pattern: entry[:eq]}
		if slices.ContainsFunc(pats, func(q WeightPattern) bool { return q.Pattern == p.Pattern }) {
			return Weight{}, errs.Value("pattern '%s' is given twice", p.Pattern)
		}
		var err error
		if p.Weight, p.Gradient, err = parseValue(entry[eq+1:]); err != nil {
			return Weight{}, errs.Value("pattern '%s': %v", p.Pattern, err)
		}
		pats = append(pats, p)
	}
	return Weight{Patterns: pats}, nil
}

// parseValue parses a number, or a gradient A:B[:C...] (g not nil).
func parseValue(text string) (v float64, g []float64, err error) {
	parts := strings.Split(text, ":")
	values := make([]float64, len(parts))
	for i, part := range parts {
		if values[i], err = parseFinite(part); err != nil {
			if errs.KindOf(err) == errs.KindValue {
				return 0, nil, err
			}
			return 0, nil, errs.Value("'%s' is not a number or a gradient A:B[:C...] of numbers", text)
		}
	}
	if len(values) > 1 {
		return 0, values, nil
	}
	return values[0], nil, nil
}

// parseFinite parses a number written as text: a plain error when it is not
// one, a ValueError naming it when it is not finite ("nan", "-inf", 1e999).
func parseFinite(text string) (float64, error) {
	text = strings.TrimSpace(text)
	v, err := strconv.ParseFloat(text, 64)
	if err != nil && !errors.Is(err, strconv.ErrRange) {
		return 0, fmt.Errorf("not a number")
	}
	if err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
		return 0, errs.Value("%s is not a finite number", text)
	}
	return v, nil
}

// decodeNumber decodes a JSON number (and nothing else: not null, not a
// string other than JSON's stand-ins for a non-finite number, "nan" or
// "inf", which are a ValueError naming them).
func decodeNumber(b []byte) (float64, error) {
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '"' {
		var s string
		if json.Unmarshal(b, &s) == nil {
			if _, err := parseFinite(s); errs.KindOf(err) == errs.KindValue {
				return 0, err
			}
		}
		return 0, fmt.Errorf("not a number")
	}
	if len(b) == 0 || !(b[0] == '-' || (b[0] >= '0' && b[0] <= '9')) {
		return 0, fmt.Errorf("not a number")
	}
	var v float64
	if err := json.Unmarshal(b, &v); err != nil {
		return 0, err
	}
	return v, nil
}

// clip shortens a JSON value for an error message.
func clip(b []byte) string {
	s := string(bytes.TrimSpace(b))
	if len(s) > 80 {
		return s[:77] + "..."
	}
	return s
}

// MarshalJSON writes the weight in the form UnmarshalJSON reads.
func (w Weight) MarshalJSON() ([]byte, error) {
	if !w.PerModule() {
		return json.Marshal(w.Value)
	}
	type entry struct {
		Pattern string `json:"pattern"`
		Weight  any    `json:"weight"`
	}
	entries := make([]entry, len(w.Patterns))
	for i, p := range w.Patterns {
		entries[i] = entry{p.Pattern, p.Weight}
		if p.Gradient != nil {
			entries[i].Weight = p.Gradient
		}
	}
	return json.Marshal(entries)
}

// Compile checks the weight of adapter i (finite numbers, at least one
// pattern, valid patterns) and returns a copy with its patterns compiled.
func (w Weight) Compile(i int) (Weight, error) {
	finite := func(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }
	if !w.PerModule() {
		if !finite(w.Value) {
			return w, errs.Value("weights[%d]: %v is not a finite number", i, w.Value)
		}
		return w, nil
	}
	if len(w.Patterns) == 0 {
		return w, errs.Value("weights[%d]: an empty list; give a number, a gradient with at least one value, or at least one pattern with its weight", i)
	}
	out := Weight{Patterns: make([]WeightPattern, len(w.Patterns))}
	for k, p := range w.Patterns {
		re, err := CompilePattern(p.Pattern)
		if err != nil {
			return w, errs.Value("weights[%d]: %v", i, err)
		}
		if p.Gradient != nil {
			if len(p.Gradient) == 0 {
				return w, errs.Value("weights[%d]: pattern '%s': a gradient needs at least one value", i, p.Pattern)
			}
			for _, v := range p.Gradient {
				if !finite(v) {
					return w, errs.Value("weights[%d]: pattern '%s': gradient value %v is not a finite number", i, p.Pattern, v)
				}
			}
		} else if !finite(p.Weight) {
			return w, errs.Value("weights[%d]: pattern '%s': %v is not a finite number", i, p.Pattern, p.Weight)
		}
		p.Gradient = slices.Clone(p.Gradient)
		p.re = re
		out.Patterns[k] = p
	}
	return out, nil
}

// Resolve returns the weight of adapter i (directory dir) for a module: the
// number, or the weight of the first pattern that matches the module name.
// layers is the number of layers of the merge (for gradients). A module
// that no pattern matches is a ValueError naming the adapter, the module
// and the patterns.
func (w Weight) Resolve(i int, dir, module string, layers int) (float64, error) {
	if !w.PerModule() {
		return w.Value, nil
	}
	for _, p := range w.Patterns {
		re := p.re
		if re == nil { // not compiled by validate (a caller inside the package)
			var err error
			if re, err = CompilePattern(p.Pattern); err != nil {
				return 0, errs.Value("weights[%d]: %v", i, err)
			}
		}
		if !re.MatchString(module) {
			continue
		}
		if p.Gradient == nil {
			return p.Weight, nil
		}
		layer, ok := layerIndex(module)
		if !ok {
			return 0, errs.Value("weights[%d]: pattern '%s' gives module %s a gradient over the layers, but its name holds no "+
				"layer index (no number between dots); put a pattern with a number for it before '%s'", i, p.Pattern, module, p.Pattern)
		}
		return gradientAt(p.Gradient, layer, layers), nil
	}
	return 0, errs.Value("weights[%d]: module %s of adapter %d (%s) matches none of its patterns (%s); add a catch-all "+
		"such as '.*' as the last pattern%s", i, module, i, dir, quotePatterns(w.Patterns), substringHint(w.Patterns, module))
}

// UnusedPatterns warns about the patterns of adapter i's per-module weight
// that give no module of the adapter (its modules in order) their weight:
// a pattern that matches none of them (a mistyped name, or one that only
// occurs inside the names, which PEFT's anchoring does not match), or one
// whose modules all take an earlier pattern's weight. Such a pattern has no
// effect, which is rarely what was meant.
func (w Weight) UnusedPatterns(i int, dir string, modules []string) []string {
	if !w.PerModule() {
		return nil
	}
	used := make([]bool, len(w.Patterns))
	matched := make([]bool, len(w.Patterns))
	res := make([]*regexp.Regexp, len(w.Patterns))
	for k, p := range w.Patterns {
		if res[k] = p.re; res[k] == nil { // not compiled by validate (fuse's stacked adapters)
			var err error
			if res[k], err = CompilePattern(p.Pattern); err != nil {
				return nil // resolve reports it
			}
		}
	}
	for _, module := range modules {
		first := true
		for k := range w.Patterns {
			if !res[k].MatchString(module) {
				continue
			}
			matched[k] = true
			if first {
				used[k], first = true, false
			}
		}
	}
	var warnings []string
	for k, p := range w.Patterns {
		switch {
		case used[k]:
		case matched[k]:
			warnings = append(warnings, fmt.Sprintf("weights[%d]: pattern '%s' gives no module of adapter %d (%s) its weight: "+
				"every module it matches matches an earlier pattern first", i, p.Pattern, i, dir))
		default:
			hint := ""
			for _, module := range modules {
				if hint = substringHint([]WeightPattern{p}, module); hint != "" {
					break
				}
			}
			warnings = append(warnings, fmt.Sprintf("weights[%d]: pattern '%s' matches no module of adapter %d (%s)%s",
				i, p.Pattern, i, dir, hint))
		}
	}
	return warnings
}

// quotePatterns lists the patterns for an error message, as written (no
// escapes doubled: 'self_attn\..*').
func quotePatterns(ps []WeightPattern) string {
	q := make([]string, len(ps))
	for i, p := range ps {
		q[i] = "'" + p.Pattern + "'"
	}
	return strings.Join(q, ", ")
}

// substringHint explains PEFT's anchoring when a pattern occurs inside the
// module name without matching its end (the usual surprise: "self_attn"
// does not match model.layers.0.self_attn.q_proj).
func substringHint(ps []WeightPattern, module string) string {
	for _, p := range ps {
		if re, err := regexp.Compile(p.Pattern); err == nil && re.MatchString(module) {
			return fmt.Sprintf(" (patterns match the end of the module name, as PEFT's rank_pattern keys do: '%s' occurs "+
				"inside %s but does not end it; write '%s' to match it anywhere)", p.Pattern, module, ".*"+wrapAlternation(p.Pattern)+".*")
		}
	}
	return ""
}

// wrapAlternation groups a pattern that holds a top-level alternation, so
// that it can be concatenated.
func wrapAlternation(p string) string {
	if strings.Contains(p, "|") {
		return "(?:" + p + ")"
	}
	return p
}

// layerIndex returns the layer index of a module: its first dotted name
// component that is a decimal number (model.layers.7.mlp.up_proj: 7).
func layerIndex(module string) (int, bool) {
	for part := range strings.SplitSeq(module, ".") {
		if part == "" || strings.TrimLeft(part, "0123456789") != "" {
			continue
		}
		if n, err := strconv.Atoi(part); err == nil {
			return n, true
		}
	}
	return 0, false
}

// LayerCount is the number of layers gradients spread over: one more than
// the largest layer index of the modules (1 when none has one).
func LayerCount(names []string) int {
	n := 0
	for _, name := range names {
		if l, ok := layerIndex(name); ok && l+1 > n {
			n = l + 1
		}
	}
	return max(n, 1)
}

// gradientAt interpolates a gradient at a layer, as mergekit does: the
// layer's position t = layer / (layers - 1) in [0, 1] is scaled to the
// values' positions and the two nearest values are mixed linearly.
func gradientAt(g []float64, layer, layers int) float64 {
	t := 0.0
	if layers > 1 {
		t = min(float64(layer)/float64(layers-1), 1)
	}
	scaled := t * float64(len(g)-1)
	i0 := int(scaled)
	i1 := min(len(g)-1, i0+1)
	frac := scaled - float64(i0)
	return (1-frac)*g[i0] + frac*g[i1]
}

// CheckSources checks the adapters of a merge and their weights: one weight
// per adapter, each compiled (into a copy: the caller's weights may be
// shared by merges running at once), and no adapter listed twice. It
// returns the compiled weights.
func CheckSources(adapters []string, weights Weights) (Weights, error) {
	if len(weights) != len(adapters) {
		return nil, errs.Value("weights: got %d weights for %d adapters; pass one weight per adapter", len(weights), len(adapters))
	}
	compiled := make(Weights, len(weights))
	for i, w := range weights {
		var err error
		if compiled[i], err = w.Compile(i); err != nil {
			return nil, err
		}
	}
	seen := map[string]int{}
	for i, a := range adapters {
		if j, ok := seen[filepath.Clean(a)]; ok {
			return nil, errs.Value("adapters: %s is listed twice (positions %d and %d)", a, j, i)
		}
		seen[filepath.Clean(a)] = i
	}
	return compiled, nil
}
