package serve

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/atomicdir"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/safetensors"
)

// Options is an export request (the bindings' JSON).
type Options struct {
	Adapter   string `json:"adapter"`
	Target    string `json:"target"`
	OutputDir string `json:"output_dir"`
	// MaxRank caps the output rank: when the target's rank for the
	// adapter would exceed it, the largest allowed rank <= MaxRank is used
	// and every module of a higher rank is truncated by an exact SVD of its
	// update (nil: no cap).
	MaxRank *int `json:"max_rank"`
	// DropModulesToSave leaves modules_to_save (and any other tensor that is
	// not a LoRA factor) out, where the target rejects them; they are listed
	// in the result. Without it such an adapter is refused.
	DropModulesToSave bool `json:"drop_modules_to_save,omitempty"`
	// DType of the written tensors ("float32", "bfloat16", "float16"; "": the adapter's).
	DType     string `json:"dtype,omitempty"`
	Overwrite bool   `json:"overwrite,omitempty"`
	// SourceName names the adapter in the model card ("": no name, for an
	// intermediate adapter whose own card follows).
	SourceName string `json:"source_name,omitempty"`
	Workers    int    `json:"workers,omitempty"`
}

// Truncation is the exact error of one module truncated to the output rank.
type Truncation struct {
	From int `json:"from"` // the module's rank
	To   int `json:"to"`
	// Tail is the discarded singular values of the module's update s B A
	// (all of them past To, decreasing).
	Tail []float64 `json:"tail"`
	// Error is the Frobenius norm of the discarded part, sqrt(sum Tail^2);
	// RelativeError divides it by the update's norm.
	Error         float64 `json:"error"`
	RelativeError float64 `json:"relative_error"`
}

// Result describes a written profile adapter.
type Result struct {
	OutputDir string `json:"output_dir"`
	Target    string `json:"target"`
	Rank      int    `json:"rank"`
	Modules   int    `json:"modules"`
	// Padded counts the modules zero-padded up to Rank (exact).
	Padded int `json:"padded"`
	// Truncated reports each truncated module's exact error, by module name.
	Truncated map[string]Truncation `json:"truncated"`
	// Dropped lists the tensors left out (DropModulesToSave).
	Dropped []string `json:"dropped"`
	// Removed lists the config keys the profile dropped or reset
	// (rank_pattern, alpha_pattern, use_rslora, modules_to_save).
	Removed []string `json:"removed"`
	DType   string   `json:"dtype"`
	Note    string   `json:"note"`
	Seconds float64  `json:"seconds"`
}

// Export writes the adapter opts.Adapter in the form opts.Target loads
// with the same numbers: every module's PEFT scale (alpha/r, alpha/sqrt(r)
// with rsLoRA, patterns applied) multiplied into B, lora_alpha = r, no
// rank_pattern / alpha_pattern, and one rank allowed by the target
// (smaller modules zero-padded, exactly; larger ones truncated when
// MaxRank asks, with their error reported). The output is written
// atomically: on any error nothing is left at OutputDir.
func Export(ctx context.Context, opts Options, progress *parallel.Progress) (*Result, error) {
	start := time.Now()
	t, err := Lookup(opts.Target)
	if err != nil {
		return nil, errs.Value("target: %v", err)
	}
	if opts.Adapter == "" {
		return nil, errs.Value("adapter: give the adapter directory to export")
	}
	if opts.OutputDir == "" {
		return nil, errs.Value("output_dir: give the directory to write the %s adapter to", t.Title)
	}
	maxRank := 0
	if opts.MaxRank != nil {
		if maxRank = *opts.MaxRank; maxRank < 1 {
			return nil, errs.Value("max_rank: must be a positive integer, got %d", maxRank)
		}
	}
	if err := adapter.CheckOutput(opts.OutputDir, opts.Overwrite); err != nil {
		return nil, err
	}
	if err := atomicdir.CheckApart(opts.OutputDir, []string{opts.Adapter}, "input adapter"); err != nil {
		return nil, err
	}
	as, err := adapter.LoadAll([]string{opts.Adapter}, true)
	if err != nil {
		return nil, err
	}
	a := as[0]
	defer a.Close()
	f := featuresOf(a)
	if err := refuse(t, a, f, opts); err != nil {
		return nil, err
	}
	rank, err := outputRank(t, f.maxRank, maxRank, opts.Adapter)
	if err != nil {
		return nil, err
	}
	dt := a.DType
	if opts.DType != "" {
		if dt, err = safetensors.ParseDType(opts.DType); err != nil {
			return nil, errs.Value("dtype: %v", err)
		}
	}
	res := &Result{OutputDir: opts.OutputDir, Target: t.Name, Rank: rank, Modules: len(a.Order),
		Truncated: map[string]Truncation{}, Dropped: []string{}, DType: dt.TorchName()}
	if t.Note != nil {
		res.Note = t.Note(rank)
	}
	if len(f.toSave) > 0 {
		res.Dropped = append(res.Dropped, f.toSave...)
	}
	cfg, removed, err := profileConfig(a.Config, rank, len(f.toSave) > 0)
	if err != nil {
		return nil, err
	}
	res.Removed = removed
	if err := write(ctx, opts, a, rank, dt, cfg, progress, res); err != nil {
		return nil, err
	}
	res.Seconds = time.Since(start).Seconds()
	return res, nil
}

// refuse reports what the target cannot load and Export cannot rewrite.
func refuse(t *Target, a *adapter.Adapter, f features, opts Options) error {
	refuses := refusal(t)
	if f.dora {
		return errs.Value("%s: DoRA adapter (use_dora / lora_magnitude_vector): %s %s DoRA adapters, and a DoRA "+
			"magnitude has no LoRA form; fuse it into the base model instead (gomerge fuse)", opts.Adapter, t.Title, refuses)
	}
	if f.bias {
		return errs.Value("%s: lora_bias: %s %s LoRA biases, and they have no LoRA form; fuse the adapter "+
			"into the base model instead (gomerge fuse)", opts.Adapter, t.Title, refuses)
	}
	if len(f.toSave) > 0 && !opts.DropModulesToSave {
		return errs.Value("%s: modules_to_save (%s): %s %s them; pass drop_modules_to_save to leave them out "+
			"(the served model then uses the base's weights for those modules)", opts.Adapter, list(f.toSave, 3), t.Title, refuses)
	}
	return nil
}

// outputRank is the one rank of the profile: the smallest allowed rank
// holding every module, or, above maxRank, the largest allowed rank <= maxRank.
func outputRank(t *Target, need, maxRank int, dir string) (int, error) {
	up, ok := t.Ranks.Up(need)
	if ok && (maxRank == 0 || up <= maxRank) {
		return up, nil
	}
	if maxRank == 0 {
		return 0, errs.Value("%s: its largest module rank is %d, above what %s loads (%s); give max_rank to truncate it, exactly, "+
			"with each module's error reported", dir, need, t.Title, t.Ranks.Text)
	}
	down, ok := t.Ranks.Down(maxRank)
	if !ok {
		return 0, errs.Value("max_rank: %d is below every rank %s loads (%s)", maxRank, t.Title, t.Ranks.Text)
	}
	return down, nil
}

// profileConfig is the profile's adapter_config.json: the adapter's own
// keys, with r = lora_alpha = rank, no patterns, use_rslora false, and
// modules_to_save cleared when dropped. removed lists what changed.
func profileConfig(c *adapter.Config, rank int, dropped bool) ([]byte, []string, error) {
	out := make(map[string]any, len(c.Raw)+4)
	for k, v := range c.Raw {
		out[k] = v
	}
	removed := []string{}
	if len(c.RankPattern) > 0 {
		removed = append(removed, "rank_pattern")
	}
	if len(c.AlphaPattern) > 0 {
		removed = append(removed, "alpha_pattern")
	}
	if c.UseRslora {
		removed = append(removed, "use_rslora")
	}
	if dropped {
		removed = append(removed, "modules_to_save")
		out["modules_to_save"] = nil
	}
	out["r"] = rank
	out["lora_alpha"] = rank
	out["rank_pattern"] = map[string]any{}
	out["alpha_pattern"] = map[string]any{}
	out["use_rslora"] = false
	out["use_dora"] = false
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return nil, nil, fmt.Errorf("profile config: %w", err)
	}
	return append(b, '\n'), removed, nil
}

// write writes the profile adapter atomically (adapter.CreateOutput):
// each module is rewritten and written by the workers as they go (the
// shapes are known in advance), so that memory holds only the modules in
// progress.
func write(ctx context.Context, opts Options, a *adapter.Adapter, rank int, dt safetensors.DType, cfg []byte, progress *parallel.Progress, res *Result) error {
	pending, err := adapter.CreateOutput(opts.OutputDir, opts.Overwrite)
	if err != nil {
		return err
	}
	committed := false
	defer func() {
		if !committed {
			pending.Abort()
		}
	}()
	path, err := pending.Path(adapter.WeightsFile)
	if err != nil {
		return err
	}
	w, err := safetensors.Create(path, outTensors(a, rank, dt), map[string]string{"format": "pt"})
	if err != nil {
		return err
	}
	err = rewriteAll(ctx, a, rank, dt, opts.Workers, progress, res, w)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := pending.WriteFile(adapter.ConfigFile, cfg); err != nil {
		return err
	}
	if err := pending.WriteFile("README.md", []byte(card(opts, a, res))); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return errs.ErrCancelled
	}
	if err := pending.Commit(); err != nil {
		return err
	}
	committed = true
	return nil
}

// card is the profile adapter's README.md: the source card's metadata
// (its YAML front matter, if any), what the export did, then the source
// card's text.
func card(opts Options, a *adapter.Adapter, res *Result) string {
	t, _ := Lookup(res.Target)
	front, body := "---\nlibrary_name: peft\n---\n", ""
	if src, err := os.ReadFile(filepath.Join(a.Dir, "README.md")); err == nil {
		body = string(src)
		if rest, ok := strings.CutPrefix(body, "---\n"); ok {
			if meta, after, ok := strings.Cut(rest, "\n---\n"); ok {
				front, body = "---\n"+meta+"\n---\n", after
			}
		}
	}
	from := ""
	if opts.SourceName != "" {
		from = fmt.Sprintf(" from `%s`", opts.SourceName)
	}
	s := fmt.Sprintf("%s\n# %s adapter\n\nWritten by `gomerge export --to %s`%s: every module's scale is multiplied into lora_B, "+
		"lora_alpha = r = %d, no rank_pattern / alpha_pattern, %d of %d modules zero-padded to rank %d (exact).\n",
		front, t.Title, t.Name, from, res.Rank, res.Padded, res.Modules, res.Rank)
	if len(res.Truncated) > 0 {
		worst := 0.0
		for _, tr := range res.Truncated {
			worst = math.Max(worst, tr.RelativeError)
		}
		s += fmt.Sprintf("\n%d modules were truncated to rank %d (max_rank); the largest relative error is %.3g.\n", len(res.Truncated), res.Rank, worst)
	}
	if len(res.Dropped) > 0 {
		s += fmt.Sprintf("\nLeft out (modules_to_save): %s.\n", list(res.Dropped, 8))
	}
	if res.Note != "" {
		s += "\nServing: " + res.Note + ".\n"
	}
	if strings.TrimSpace(body) != "" {
		s += "\n## The source adapter's card\n\n" + strings.TrimLeft(body, "\n")
	}
	return s
}
