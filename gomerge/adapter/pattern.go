package adapter

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
)

// PatternEntry is one key of a rank_pattern or alpha_pattern.
type PatternEntry struct {
	Key   string
	Value float64
	re    *regexp.Regexp
}

// Patterns is a rank_pattern or alpha_pattern in the order of the JSON
// object: PEFT uses the first key that matches.
type Patterns []PatternEntry

// ParsePatterns decodes a JSON object of pattern -> number, keeping the
// order of its keys, and compiles each key with PEFT's rule.
func ParsePatterns(raw json.RawMessage) (Patterns, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil || tok != json.Delim('{') {
		return nil, fmt.Errorf("expected an object of pattern -> number")
	}
	var out Patterns
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := kt.(string)
		var num json.Number
		if err := dec.Decode(&num); err != nil {
			return nil, fmt.Errorf("pattern %q: value is not a number", key)
		}
		v, err := num.Float64()
		if err != nil {
			return nil, fmt.Errorf("pattern %q: %v", key, err)
		}
		re, err := CompilePattern(key)
		if err != nil {
			return nil, err
		}
		out = append(out, PatternEntry{Key: key, Value: v, re: re})
	}
	return out, nil
}

// CompilePattern compiles a rank/alpha pattern key the way PEFT matches it:
// re.match(rf"(.*\.)?({key})$", module_path).
func CompilePattern(key string) (*regexp.Regexp, error) {
	re, err := regexp.Compile(`^(?:.*\.)?(?:` + key + `)$`)
	if err != nil {
		return nil, fmt.Errorf("pattern %q is not a regular expression gomerge supports (RE2 syntax): %v", key, err)
	}
	return re, nil
}

// Resolve returns the value of the first pattern matching the module path
// (without the "base_model.model." prefix), and whether one matched.
func (p Patterns) Resolve(module string) (float64, bool) {
	for _, e := range p {
		if e.re.MatchString(module) {
			return e.Value, true
		}
	}
	return 0, false
}

// MarshalJSON writes the patterns as an object in their order.
func (p Patterns) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, e := range p {
		if i > 0 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(e.Key)
		v, _ := json.Marshal(e.Value)
		b.Write(k)
		b.WriteByte(':')
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}
