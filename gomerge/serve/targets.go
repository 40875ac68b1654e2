package serve

import (
	"fmt"
	"sort"
	"strings"
)

// Policy is what a target does with a feature that LoRA factors cannot
// carry (DoRA magnitudes, modules_to_save tensors).
type Policy int

// Policies of a target for a feature.
const (
	// Refused: the target rejects adapters with it; Export refuses them too.
	Refused Policy = iota
	// Droppable: the target rejects adapters with it; Export leaves it out
	// when asked (DropModulesToSave), and lists what it left out.
	Droppable
)

// RankSet is the set of ranks a target loads: a listed set, or a rule.
type RankSet struct {
	// Listed, when not nil, is every allowed rank, increasing.
	Listed []int
	// Rule, when Listed is nil, says whether a rank is allowed.
	Rule func(r int) bool
	// Max is the largest rank allowed (0: none).
	Max int
	// Text describes the set for messages.
	Text string
}

// Allowed says whether the set holds rank r.
func (s RankSet) Allowed(r int) bool {
	if r < 1 || (s.Max > 0 && r > s.Max) {
		return false
	}
	if s.Listed != nil {
		i := sort.SearchInts(s.Listed, r)
		return i < len(s.Listed) && s.Listed[i] == r
	}
	return s.Rule(r)
}

// Up is the smallest allowed rank >= r, and false when there is none.
func (s RankSet) Up(r int) (int, bool) {
	for v := max(r, 1); s.Max == 0 || v <= s.Max; v++ {
		if s.Allowed(v) {
			return v, true
		}
	}
	return 0, false
}

// Down is the largest allowed rank <= r, and false when there is none.
func (s RankSet) Down(r int) (int, bool) {
	if s.Max > 0 {
		r = min(r, s.Max)
	}
	for v := r; v >= 1; v-- {
		if s.Allowed(v) {
			return v, true
		}
	}
	return 0, false
}

// Target is one serving engine's rules for the LoRA adapters it loads.
type Target struct {
	Name string
	// Title is the engine's name as written in messages.
	Title string
	Ranks RankSet
	// UpTo says that Ranks lists the server's max_lora_rank values: an
	// adapter of any rank up to the largest loads as it is (the profile
	// still pads to a value of the set).
	UpTo bool
	// Patterns says whether the target honours rank_pattern / alpha_pattern;
	// where it does not, every module is scaled by the global lora_alpha / r.
	Patterns bool
	// RsLoRA says whether the target honours use_rslora.
	RsLoRA bool
	// OneRank and AlphaIsR: the form needs one rank for every module, and
	// lora_alpha = r with the scales in B (the portable form's definition).
	OneRank, AlphaIsR bool
	// ModulesToSave and DoRA: what the target does with them (it loads neither).
	ModulesToSave Policy
	DoRA          Policy
	// Confirmed says whether the refusals of DoRA, LoRA biases and
	// modules_to_save were read in the target's code or issues; where not,
	// they are treated as refused, and messages say "not known to load".
	Confirmed bool
	// Note is what to tell a user serving an adapter of rank r there ("" for nothing).
	Note func(r int) string
	// Sources are where each rule was read.
	Sources []string
}

var vllmRanks = []int{1, 8, 16, 32, 64, 128, 256, 320, 512}

// vllmDefaultMaxRank is vLLM's default max_lora_rank.
const vllmDefaultMaxRank = 16

// Targets is the table of serving targets, in the order of the docs.
var Targets = []Target{
	{
		Name:  "vllm",
		Title: "vLLM",
		Ranks: RankSet{Listed: vllmRanks, Max: 512, Text: "one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (max_lora_rank)"},
		// The snapshot read ignores the patterns and scales by the global alpha / r; that it honours
		// use_rslora was not confirmed there, so an rsLoRA adapter is treated as not loading as is.
		UpTo:     true,
		Patterns: false, RsLoRA: false,
		ModulesToSave: Droppable, DoRA: Refused, Confirmed: true,
		Note: func(r int) string {
			if r > vllmDefaultMaxRank {
				up, _ := RankSet{Listed: vllmRanks, Max: 512}.Up(r)
				return fmt.Sprintf("start vLLM with --max-lora-rank %d or more (its default is %d)", up, vllmDefaultMaxRank)
			}
			return ""
		},
		Sources: []string{
			"vllm/config/lora.py (max_lora_rank choices, default 16)",
			"vllm/lora/peft_helper.py validate_legal (r <= max_lora_rank)",
			"vllm-project/vllm#9280 (modules_to_save rejected; a newer PEFTHelper allows only classifier / score)",
			"vLLM's LoRA loading (DoRA rejected), as read for the project's deploy-targets notes",
			"vllm-project/vllm @e745baf (rank_pattern / alpha_pattern ignored: global alpha / r)",
		},
	},
	{
		Name:  "sglang",
		Title: "SGLang",
		Ranks: RankSet{Rule: func(int) bool { return true }, Text: "any rank (max_lora_rank is inferred from the adapters given at start)"},
		// lora_config.py keeps the patterns; that it honours use_rslora is not
		// confirmed, so an rsLoRA adapter is treated as not loading as is.
		Patterns: true, RsLoRA: false,
		ModulesToSave: Droppable, DoRA: Refused,
		Note: func(int) string {
			return "load it at start (--lora-paths) or set --max-lora-rank: a later adapter of a higher rank has failed (sgl-project/sglang#7808)"
		},
		Sources: []string{
			"sglang python/sglang/srt/lora/lora_config.py (rank_pattern / alpha_pattern kept)",
			"sgl-project/sglang#7808 (a higher-rank adapter loaded later)",
			"sgl-project/sglang#11034, #25913 (prefixed names and regex targets rejected)",
		},
	},
	{
		Name:  "lorax",
		Title: "LoRAX",
		Ranks: RankSet{Rule: func(r int) bool { return r == 8 || (r > 8 && r%16 == 0) }, Text: "8, or a multiple of 16 above 8 (SGMV kernels)"},
		// patterns and use_rslora: not confirmed to be honoured, treated as ignored
		Patterns: false, RsLoRA: false,
		ModulesToSave: Droppable, DoRA: Refused,
		Sources: []string{
			"predibase/lorax#256, #241 (SGMV kernels: rank >= 8, a multiple of 16 above 8)",
		},
	},
	{
		Name:     "portable",
		Title:    "the portable form",
		Ranks:    RankSet{Listed: []int{8, 16, 32, 64, 128, 256, 320, 512}, Max: 512, Text: "one of 8, 16, 32, 64, 128, 256, 320, 512 (vLLM's and LoRAX's sets together)"},
		Patterns: false, RsLoRA: false, OneRank: true, AlphaIsR: true,
		ModulesToSave: Droppable, DoRA: Refused, Confirmed: true, // by definition
		Sources: []string{
			"the rules of vLLM, SGLang and LoRAX together: scales in B, lora_alpha = r, one rank, no patterns, no modules_to_save",
		},
	},
}

// Lookup returns the target named name (case-insensitive), or an error
// listing the targets.
func Lookup(name string) (*Target, error) {
	for i := range Targets {
		if strings.EqualFold(Targets[i].Name, name) {
			return &Targets[i], nil
		}
	}
	return nil, fmt.Errorf("unknown serving target %q (the targets: %s)", name, strings.Join(Names(), ", "))
}

// Names lists the targets' names.
func Names() []string {
	out := make([]string, len(Targets))
	for i, t := range Targets {
		out[i] = t.Name
	}
	return out
}

// TargetInfo is a row of the table as the bindings report it.
type TargetInfo struct {
	Name          string   `json:"name"`
	Title         string   `json:"title"`
	Ranks         string   `json:"ranks"`
	UpTo          bool     `json:"ranks_up_to"`
	OneRank       bool     `json:"one_rank"`
	AlphaIsR      bool     `json:"alpha_is_r"`
	Patterns      bool     `json:"patterns"`
	RsLoRA        bool     `json:"rslora"`
	ModulesToSave string   `json:"modules_to_save"`
	DoRA          string   `json:"dora"`
	Sources       []string `json:"sources"`
}

func (p Policy) String() string {
	if p == Droppable {
		return "refused; dropped on request"
	}
	return "refused"
}

// Table is the table of targets as data.
func Table() []TargetInfo {
	out := make([]TargetInfo, len(Targets))
	for i, t := range Targets {
		out[i] = TargetInfo{Name: t.Name, Title: t.Title, Ranks: t.Ranks.Text, UpTo: t.UpTo, OneRank: t.OneRank, AlphaIsR: t.AlphaIsR, Patterns: t.Patterns, RsLoRA: t.RsLoRA,
			ModulesToSave: t.ModulesToSave.String(), DoRA: t.DoRA.String(), Sources: t.Sources}
	}
	return out
}
