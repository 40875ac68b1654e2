package serve

import (
	"fmt"
	"sort"
	"strings"

	"gomerge/gomerge/adapter"
)

// Verdict says whether an adapter loads on a target as it is, and why not.
type Verdict struct {
	Target string `json:"target"`
	// Loads is true when the target loads the adapter as it is, with the
	// numbers PEFT gives.
	Loads bool `json:"loads"`
	// Reasons say why it does not (empty when it does).
	Reasons []string `json:"reasons"`
	// Fixable is true when Export writes a form that loads (with
	// DropModulesToSave where a reason is modules_to_save).
	Fixable bool `json:"fixable"`
	// Note is advice for serving it there ("" for none).
	Note string `json:"note"`
}

// features is what the rules look at in an adapter.
type features struct {
	dora, bias    bool
	toSave        []string // modules_to_save and other tensors that are not LoRA factors
	ranks         map[int]int
	maxRank       int
	rslora        bool
	alphaIsR      bool     // every module's lora_alpha equals its rank, rsLoRA off: scale 1
	patternScaled []string // modules whose PEFT scale differs from the global alpha / r
	globalScale   float64
}

func featuresOf(a *adapter.Adapter) features {
	c := a.Config
	f := features{dora: c.UseDora, bias: c.LoraBias, ranks: map[int]int{}, rslora: c.UseRslora,
		globalScale: c.Scaling(c.R, c.LoraAlpha), alphaIsR: !c.UseRslora}
	f.toSave = append(f.toSave, a.Extra...)
	if raw, ok := c.Raw["modules_to_save"]; ok && string(raw) != "null" && string(raw) != "[]" && len(f.toSave) == 0 {
		f.toSave = append(f.toSave, "modules_to_save "+string(raw))
	}
	for _, name := range a.Order {
		m := a.Modules[name]
		if m.Magnitude.Shape != nil {
			f.dora = true
		}
		if m.Bias.Shape != nil {
			f.bias = true
		}
		f.ranks[m.Rank]++
		f.maxRank = max(f.maxRank, m.Rank)
		if !sameScale(m.Scaling, f.globalScale) {
			f.patternScaled = append(f.patternScaled, fmt.Sprintf("%s (%g, not %g)", name, m.Scaling, f.globalScale))
		}
		if m.Alpha != float64(m.Rank) {
			f.alphaIsR = false
		}
	}
	return f
}

// sameScale compares two scales computed in float64 from the same numbers.
func sameScale(a, b float64) bool {
	d := a - b
	return d <= 1e-12*max(abs(a), abs(b)) && -d <= 1e-12*max(abs(a), abs(b))
}

func abs(x float64) float64 {
	if x < 0 {
		return -x
	}
	return x
}

// Check says, for every target, whether the adapter loads there as it is.
func Check(a *adapter.Adapter) []Verdict {
	f := featuresOf(a)
	out := make([]Verdict, len(Targets))
	for i := range Targets {
		out[i] = check(&Targets[i], f)
	}
	return out
}

func check(t *Target, f features) Verdict {
	v := Verdict{Target: t.Name, Fixable: true, Reasons: []string{}}
	refuses := refusal(t)
	if f.dora {
		v.Reasons = append(v.Reasons, fmt.Sprintf("DoRA (use_dora, lora_magnitude_vector): %s %s DoRA adapters, "+
			"and their magnitudes have no LoRA form (fuse the adapter into the base instead)", t.Title, refuses))
		v.Fixable = false
	}
	if f.bias {
		v.Reasons = append(v.Reasons, fmt.Sprintf("lora_bias: %s %s LoRA biases, and they have no LoRA form "+
			"(fuse the adapter into the base instead)", t.Title, refuses))
		v.Fixable = false
	}
	if len(f.toSave) > 0 {
		v.Reasons = append(v.Reasons, fmt.Sprintf("modules_to_save (%s): %s %s them; export can leave them out (drop_modules_to_save)",
			list(f.toSave, 3), t.Title, refuses))
	}
	ranks := sortedKeys(f.ranks)
	if !t.Patterns && len(f.patternScaled) > 0 {
		v.Reasons = append(v.Reasons, fmt.Sprintf("rank_pattern / alpha_pattern: %s ignores them and scales every module by lora_alpha / r = %g, "+
			"so %d modules would be scaled wrongly, silently: %s", t.Title, f.globalScale, len(f.patternScaled), list(f.patternScaled, 3)))
	}
	if f.rslora && !t.RsLoRA {
		v.Reasons = append(v.Reasons, fmt.Sprintf("use_rslora: %s is not known to honour it (scale alpha/sqrt(r)); export bakes the scale into B", t.Title))
	}
	for _, r := range ranks {
		if !allowedAsIs(t, r) {
			v.Reasons = append(v.Reasons, fmt.Sprintf("rank %d (%d modules): %s needs %s", r, f.ranks[r], t.Title, t.Ranks.Text))
			if _, ok := t.Ranks.Up(f.maxRank); !ok {
				v.Reasons[len(v.Reasons)-1] += "; export needs max_rank to truncate"
			}
			break
		}
	}
	if t.OneRank && len(ranks) > 1 {
		v.Reasons = append(v.Reasons, fmt.Sprintf("mixed ranks %v: %s has one rank", ranks, t.Title))
	}
	if t.AlphaIsR && !f.alphaIsR {
		v.Reasons = append(v.Reasons, fmt.Sprintf("lora_alpha differs from r (or rsLoRA): %s has its scales in B and lora_alpha = r", t.Title))
	}
	v.Loads = len(v.Reasons) == 0
	if v.Loads && t.Note != nil {
		v.Note = t.Note(f.maxRank)
	}
	return v
}

// refusal is how messages say that t does not load a feature: "does not
// load" where read in its code or issues, "is not known to load" otherwise.
func refusal(t *Target) string {
	if t.Confirmed {
		return "does not load"
	}
	return "is not known to load"
}

// allowedAsIs says whether a module of rank r loads on t: any rank up to
// the largest of the set where the set is of max_lora_rank values (UpTo),
// otherwise a rank of the set.
func allowedAsIs(t *Target, r int) bool {
	if t.UpTo {
		_, ok := t.Ranks.Up(r)
		return ok
	}
	return t.Ranks.Allowed(r)
}

func sortedKeys(m map[int]int) []int {
	out := make([]int, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Ints(out)
	return out
}

// list joins the first n items, and says how many more there are.
func list(items []string, n int) string {
	if len(items) <= n {
		return strings.Join(items, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(items[:n], ", "), len(items)-n)
}

// CheckDir loads an adapter directory (DoRA and LoRA biases included) and
// checks it against every target.
func CheckDir(dir string) ([]Verdict, error) {
	as, err := adapter.LoadAll([]string{dir}, true)
	if err != nil {
		return nil, err
	}
	defer as[0].Close()
	return Check(as[0]), nil
}
