package fuse

import (
	"context"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"sync"

	"gomerge/gomerge/card"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/quant"
	"gomerge/gomerge/safetensors"
)

// Fusing into quantized bases: a base folder whose config has a
// quantization_config (bitsandbytes 4-bit and int8, fine-grained FP8,
// compressed-tensors / fbgemm FP8) is read through package quant. Each
// quantized weight is dequantized (to its dtype, as the reference
// dequantizer returns it), the update is added in float64 and rounded
// once, and the sum is written either dequantized (Options.DType) or
// requantized to the base's own format (Options.KeepFormat), with the
// statistics of the changed tensors rewritten and every other tensor
// copied byte for byte. Each changed tensor's survival is reported.

// DefaultSurvivalThreshold is the survival below which a changed tensor is
// named in a warning.
const DefaultSurvivalThreshold = 0.5

// QuantReport is the quantized-base part of a fuse's result.
type QuantReport struct {
	Method    string  `json:"method"`     // the base's format: "bitsandbytes nf4", "fp8 block 128x128", ...
	Output    string  `json:"output"`     // "keep_format", or the dtype written
	MergeBase string  `json:"merge_base"` // "dequant" or "w16"
	Threshold float64 `json:"threshold"`
	// Tensors are the changed quantized tensors, by name.
	Tensors []QuantTensorReport `json:"tensors"`
}

// QuantTensorReport is the survival of one changed tensor: with W the base
// the update dW is added to and Q the written tensor (dequantized),
// survival = <Q - W, dW> / ||dW||^2 (1: the update survived exactly, 0:
// it vanished) and residual = ||Q - (W + dW)|| / ||dW||.
type QuantTensorReport struct {
	Tensor   string  `json:"tensor"`
	Format   string  `json:"format"`
	Survival float64 `json:"survival"`
	Residual float64 `json:"residual"`
	// ReferenceGap is ||deq(Wq) - W16|| / ||dW|| with Options.ReferenceBase.
	ReferenceGap *float64 `json:"reference_gap,omitempty"`
}

type quantFormat int

const (
	qBnb4 quantFormat = iota + 1
	qInt8
	qFP8Block
	qFP8Scaled
	qMXFP4
)

// quantTensor is one quantized weight of the base and its statistics.
type quantTensor struct {
	format quantFormat
	weight string
	stats  map[string]string // role (absmax, quant_map, nested_absmax, nested_quant_map, quant_state, SCB, scale) -> tensor
	shape  []int             // the weight's logical shape
	dtype  safetensors.DType // what the dequantized values are rounded to
	bnb    quant.Bnb4State
	block  [2]int
	file   string
	dense  string // MXFP4: the parameter's name (the blocks' without _blocks)
}

// quantPlan is what a fuse knows of its base's quantization.
type quantPlan struct {
	method    string
	keep      bool
	mergeW16  bool
	threshold float64
	byWeight  map[string]*quantTensor
	ownerOf   map[string]*quantTensor // statistic tensor -> its weight
	ref       *modelfolder.Folder     // Options.ReferenceBase
	writers   map[string]*safetensors.Writer

	mu      sync.Mutex
	reports []QuantTensorReport
	heavy   sync.Mutex // held while a quantized tensor is computed
}

// unsupportedMethods are quantization methods fuse does not read yet, with what to say.
var unsupportedMethods = map[string]string{
	"gptq": "GPTQ is not supported yet (it is next, with AWQ)",
	"awq":  "AWQ is not supported yet (it is next, with GPTQ)",
}

// planQuant reads the base's quantization_config and the statistics of
// every quantized weight (headers and the small quant_state tensors only),
// and marks the plan's tensors: quantized weights take their logical
// shape (and, written dequantized, the output dtype); statistics are
// dropped from a dequantized output.
func (p *fusePlan) planQuant(opts *Options, base *modelfolder.Folder) error {
	cfg, _ := base.Config()["quantization_config"].(map[string]any)
	if cfg == nil {
		if opts.KeepFormat {
			return errs.Value("keep_format: the base model %s is not quantized (its config has no quantization_config)", base.Dir)
		}
		if opts.ReferenceBase != "" || opts.MergeBase != "" {
			return errs.Value("reference_base and merge_base apply to quantized bases; %s is not quantized", base.Dir)
		}
		return nil
	}
	method, _ := cfg["quant_method"].(string)
	if msg, ok := unsupportedMethods[strings.ToLower(method)]; ok {
		return errs.Value("%s: quantization_config.quant_method %q: %s", base.Dir, method, msg)
	}
	if opts.KeepFormat == (opts.DType != "") {
		return errs.Value("%s is quantized (%s): pass dtype (bfloat16, float16 or float32) to write the fused model dequantized, or keep_format=True to requantize the changed tensors (one of the two)", base.Dir, method)
	}
	q := &quantPlan{keep: opts.KeepFormat, threshold: DefaultSurvivalThreshold, byWeight: map[string]*quantTensor{}, ownerOf: map[string]*quantTensor{}}
	if opts.SurvivalThreshold != nil {
		q.threshold = *opts.SurvivalThreshold
	}
	switch opts.MergeBase {
	case "", "dequant":
	case "w16":
		if opts.ReferenceBase == "" {
			return errs.Value("merge_base: \"w16\" adds the update to the 16-bit original, which needs reference_base")
		}
		q.mergeW16 = true
	default:
		return errs.Value("merge_base: expected \"dequant\" or \"w16\", got %q", opts.MergeBase)
	}
	var err error
	switch method {
	case "bitsandbytes":
		err = q.findBnb(cfg, base)
	case "fp8":
		err = q.findFP8Block(cfg, base)
	case "compressed-tensors", "fbgemm_fp8":
		q.method = method + " fp8"
		err = q.findFP8Scaled(base)
	case "mxfp4":
		q.method = "mxfp4"
		err = q.findMXFP4(base)
	default:
		return errs.Value("%s: quantization_config.quant_method %q is not supported by fuse (supported: bitsandbytes, fp8, compressed-tensors and fbgemm_fp8 FP8, mxfp4)", base.Dir, method)
	}
	if err != nil {
		return err
	}
	var outDType safetensors.DType
	if opts.DType != "" {
		outDType, _ = safetensors.ParseDType(opts.DType)
	}
	for name, qt := range q.byWeight {
		t := p.byName[name]
		t.quant = qt
		t.stored = t.shape
		t.shape = qt.shape
		t.dtype = "" // its stored bytes: copied as they are, or written by fuseQuantOne
		if !q.keep {
			t.dtype, t.stored = outDType, nil
			for _, s := range qt.stats {
				delete(p.byName, s)
			}
			if qt.format == qMXFP4 { // written as the parameter transformers' dequantizing loader makes
				p.renameOutput(t, qt.dense)
			}
		}
	}
	if opts.ReferenceBase != "" {
		if q.ref, err = modelfolder.Open(opts.ReferenceBase); err != nil {
			return err
		}
	}
	p.quant = q
	return nil
}

// reserveQuantState gives the quant_state of each changed nested bnb
// weight written in its own format room for its new offset: the JSON is
// padded with spaces to the length of the longest float's (JSON allows
// them; bitsandbytes' json.loads reads it).
func (p *fusePlan) reserveQuantState() {
	if p.quant == nil || !p.quant.keep {
		return
	}
	for _, qt := range p.quant.byWeight {
		if qt.format == qBnb4 && qt.bnb.Nested() && len(p.byName[qt.weight].ops) > 0 {
			p.byName[qt.stats["quant_state"]].stored = []int{bnbStateRoom(qt.bnb)}
		}
	}
}

// bnbStateRoom is the room reserved for a requantized nested quant_state.
func bnbStateRoom(s quant.Bnb4State) int {
	longest := -1.2345678901234567e-300
	s.NestedOffset = &longest
	return len(s.JSON())
}

// stateFile names the file of a base tensor in errors.
func stateFile(base *modelfolder.Folder, name string) string {
	info, _ := base.Info(name)
	return base.Dir + "/" + info.Shard
}

func (q *quantPlan) findBnb(cfg map[string]any, base *modelfolder.Folder) error {
	if in4, _ := cfg["load_in_4bit"].(bool); in4 {
		q.method = "bitsandbytes 4-bit"
		for _, n := range base.Names() {
			i := strings.Index(n, ".weight.quant_state.bitsandbytes__")
			if i < 0 {
				continue
			}
			w := n[:i] + ".weight"
			file := stateFile(base, n)
			raw, err := base.ReadRaw(n, nil)
			if err != nil {
				return err
			}
			st, err := quant.ParseBnb4State(raw)
			if err != nil {
				return errs.Value("%s: tensor %s: %v", file, n, err)
			}
			if !strings.HasSuffix(n, "__"+st.QuantType) {
				return errs.Value("%s: tensor %s holds a %s quant_state", file, n, st.QuantType)
			}
			if info, ok := base.Info(w); ok {
				if size, _ := safetensors.RawDTypeSize(info.RawDType); size*safetensors.Numel(info.Shape) != st.PackedBytes() {
					return errs.Value("%s: tensor %s has %d bytes, but its quant_state %s says shape %v, which needs %d bytes",
						file, w, size*safetensors.Numel(info.Shape), n, st.Shape, st.PackedBytes())
				}
			}
			q.method = "bitsandbytes " + st.QuantType
			qt := &quantTensor{format: qBnb4, weight: w, bnb: st, shape: st.Shape, file: file, stats: map[string]string{"quant_state": n}}
			if qt.dtype, err = safetensors.ParseDType(st.DType); err != nil {
				return errs.Value("%s: tensor %s: %v", file, n, err)
			}
			roles := []string{"absmax", "quant_map"}
			if st.Nested() {
				roles = append(roles, "nested_absmax", "nested_quant_map")
			}
			for _, r := range roles {
				s := w + "." + r
				if _, ok := base.Info(s); !ok {
					return errs.Value("%s: the 4-bit weight %s has no %s tensor (%s)", file, w, r, s)
				}
				qt.stats[r] = s
			}
			if err := q.add(base, qt); err != nil {
				return err
			}
		}
		return nil
	}
	if in8, _ := cfg["load_in_8bit"].(bool); in8 {
		q.method = "bitsandbytes int8"
		dt := configDType(base)
		for _, n := range base.Names() {
			pfx, ok := strings.CutSuffix(n, ".SCB")
			if !ok {
				continue
			}
			w := pfx + ".weight"
			info, ok := base.Info(w)
			file := stateFile(base, n)
			if !ok || info.RawDType != "I8" || len(info.Shape) != 2 {
				return errs.Value("%s: %s has no int8 2-D weight %s", file, n, w)
			}
			qt := &quantTensor{format: qInt8, weight: w, shape: info.Shape, dtype: dt, file: file, stats: map[string]string{"SCB": n}}
			if f := pfx + ".weight_format"; hasTensor(base, f) {
				qt.stats["weight_format"] = f
			}
			if err := q.add(base, qt); err != nil {
				return err
			}
		}
		return nil
	}
	return errs.Value("%s: quantization_config (bitsandbytes) sets neither load_in_4bit nor load_in_8bit", base.Dir)
}

func hasTensor(base *modelfolder.Folder, name string) bool {
	_, ok := base.Info(name)
	return ok
}

// configDType is the model's dtype from its config (bfloat16 when it names
// none): what its dequantized weights are rounded to.
func configDType(base *modelfolder.Folder) safetensors.DType {
	for _, k := range []string{"dtype", "torch_dtype"} {
		if s, ok := base.Config()[k].(string); ok {
			if d, err := safetensors.ParseDType(s); err == nil {
				return d
			}
		}
	}
	return safetensors.BF16
}

func (q *quantPlan) findFP8Block(cfg map[string]any, base *modelfolder.Folder) error {
	bs, _ := cfg["weight_block_size"].([]any)
	if len(bs) != 2 {
		return errs.Value("%s: quantization_config (fp8) has no weight_block_size [rows, cols] (per-tensor fine-grained FP8 is not supported)", base.Dir)
	}
	var block [2]int
	for i, v := range bs {
		f, err := strconv.ParseFloat(fmt.Sprint(v), 64) // a json.Number from the config
		if err != nil || f < 1 || f != math.Trunc(f) || f > 1<<20 {
			return errs.Value("%s: quantization_config.weight_block_size %v is not two positive integers", base.Dir, bs)
		}
		block[i] = int(f)
	}
	q.method = fmt.Sprintf("fp8 block %dx%d", block[0], block[1])
	dt := configDType(base)
	for _, n := range base.Names() {
		pfx, ok := strings.CutSuffix(n, ".weight_scale_inv")
		if !ok {
			continue
		}
		w := pfx + ".weight"
		file := stateFile(base, n)
		info, ok := base.Info(w)
		if !ok || info.RawDType != "F8_E4M3" || len(info.Shape) != 2 {
			return errs.Value("%s: %s has no F8_E4M3 2-D weight %s", file, n, w)
		}
		sinfo, _ := base.Info(n)
		f := quant.FP8Block{Rows: info.Shape[0], Cols: info.Shape[1], BlockRows: block[0], BlockCols: block[1]}
		want := f.ScaleShape()
		if len(sinfo.Shape) != 2 || sinfo.Shape[0] != want[0] || sinfo.Shape[1] != want[1] {
			return errs.Value("%s: tensor %s has shape %v; the weight %s %v in %dx%d blocks needs %v (ragged edge blocks count as whole blocks)",
				file, n, sinfo.Shape, w, info.Shape, block[0], block[1], want)
		}
		qt := &quantTensor{format: qFP8Block, weight: w, shape: info.Shape, dtype: dt, block: block, file: file, stats: map[string]string{"scale": n}}
		if err := q.add(base, qt); err != nil {
			return err
		}
	}
	return nil
}

func (q *quantPlan) findFP8Scaled(base *modelfolder.Folder) error {
	dt := configDType(base)
	for _, n := range base.Names() {
		pfx, ok := strings.CutSuffix(n, ".weight_scale")
		if !ok {
			continue
		}
		w := pfx + ".weight"
		file := stateFile(base, n)
		info, ok := base.Info(w)
		if !ok || info.RawDType != "F8_E4M3" || len(info.Shape) != 2 {
			return errs.Value("%s: %s has no F8_E4M3 2-D weight %s (only FP8 weights of compressed-tensors are supported)", file, n, w)
		}
		sinfo, _ := base.Info(n)
		if k := safetensors.Numel(sinfo.Shape); k != 1 && k != info.Shape[0] {
			return errs.Value("%s: tensor %s has shape %v: neither one scale nor one per output row of %s %v", file, n, sinfo.Shape, w, info.Shape)
		}
		qt := &quantTensor{format: qFP8Scaled, weight: w, shape: info.Shape, dtype: dt, file: file, stats: map[string]string{"scale": n}}
		if err := q.add(base, qt); err != nil {
			return err
		}
	}
	return nil
}

func (q *quantPlan) add(base *modelfolder.Folder, qt *quantTensor) error {
	if !hasTensor(base, qt.weight) {
		return errs.Value("%s: statistics of %s are stored, the weight itself is missing", qt.file, qt.weight)
	}
	q.byWeight[qt.weight] = qt
	for _, s := range qt.stats {
		q.ownerOf[s] = qt
	}
	return nil
}

// quantized is what a worker holds of one quantized weight.
type quantized struct {
	packed []byte
	bnb    *quant.Bnb4
	scales []float32
	e8m0   []byte // MXFP4 scales
}

// read reads a quantized weight and its statistics, validated.
func (qt *quantTensor) read(base *modelfolder.Folder) (*quantized, error) {
	bad := func(format string, a ...any) error {
		return errs.Value("%s: tensor %s: %s", qt.file, qt.weight, fmt.Sprintf(format, a...))
	}
	packed, err := base.ReadRaw(qt.weight, nil)
	if err != nil {
		return nil, err
	}
	f32 := func(role string) ([]float32, error) {
		n := qt.stats[role]
		info, _ := base.Info(n)
		if info.DType == "" {
			return nil, errs.Value("%s: tensor %s has dtype %s, not a float", qt.file, n, info.RawDType)
		}
		x, _, err := base.ReadFloat32(n) // NaN and Inf are refused here, naming the tensor
		return x, err
	}
	out := &quantized{packed: packed}
	n := safetensors.Numel(qt.shape)
	switch qt.format {
	case qBnb4:
		b := &quant.Bnb4{State: qt.bnb}
		if b.QuantMap, err = f32("quant_map"); err != nil {
			return nil, err
		}
		if qt.bnb.Nested() {
			if b.AbsmaxCodes, err = base.ReadRaw(qt.stats["absmax"], nil); err != nil {
				return nil, err
			}
			if b.NestedAbsmax, err = f32("nested_absmax"); err != nil {
				return nil, err
			}
			if b.NestedQuantMap, err = f32("nested_quant_map"); err != nil {
				return nil, err
			}
		} else if b.Absmax, err = f32("absmax"); err != nil {
			return nil, err
		}
		if err := b.Check(len(packed)); err != nil {
			return nil, bad("%v", err)
		}
		out.bnb = b
	case qInt8:
		if out.scales, err = f32("SCB"); err != nil {
			return nil, err
		}
		if len(out.scales) != qt.shape[0] || len(packed) != n {
			return nil, bad("SCB has %d values for %d rows", len(out.scales), qt.shape[0])
		}
	case qMXFP4:
		if out.e8m0, err = qt.readMXFP4Scales(base, len(packed)); err != nil {
			return nil, err
		}
	case qFP8Block, qFP8Scaled:
		if out.scales, err = f32("scale"); err != nil {
			return nil, err
		}
		if len(packed) != n {
			return nil, bad("%d bytes for shape %v", len(packed), qt.shape)
		}
	}
	return out, nil
}

// dequantize writes the weight's values, rounded to its dtype.
func (qt *quantTensor) dequantize(dst []float32, q *quantized) {
	switch qt.format {
	case qBnb4:
		q.bnb.Dequantize(dst, q.packed, quant.RoundTo(qt.dtype.TorchName()))
		return
	case qMXFP4:
		qt.mxfp4Dequantize(dst, q.packed, q.e8m0, 0)
	case qInt8:
		quant.Int8Dequantize(dst, q.packed, q.scales, qt.shape[0], qt.shape[1])
	case qFP8Block:
		quant.FP8Block{Rows: qt.shape[0], Cols: qt.shape[1], BlockRows: qt.block[0], BlockCols: qt.block[1]}.Dequantize(dst, q.packed, q.scales)
	case qFP8Scaled:
		quant.FP8Scaled{Rows: qt.shape[0], Cols: qt.shape[1], PerChannel: len(q.scales) > 1}.Dequantize(dst, q.packed, q.scales)
	}
	if r := quant.RoundTo(qt.dtype.TorchName()); r != nil {
		parallel.For(len(dst), 1<<16, func(lo, hi int) {
			for i := lo; i < hi; i++ {
				dst[i] = r(dst[i])
			}
		})
	}
}

// requantize quantizes x into the base's format: the new weight bytes and
// statistics (tensor name -> bytes).
func (qt *quantTensor) requantize(x []float32, old *quantized, stored map[string][]int) map[string][]byte {
	out := map[string][]byte{}
	switch qt.format {
	case qBnb4:
		packed := make([]byte, len(old.packed))
		nb := old.bnb.Requantize(packed, x)
		out[qt.weight] = packed
		if nb.State.Nested() {
			out[qt.stats["absmax"]] = nb.AbsmaxCodes
			out[qt.stats["nested_absmax"]] = safetensors.Float32AsBytes(nb.NestedAbsmax)
			js := nb.State.JSON()
			room := safetensors.Numel(stored[qt.stats["quant_state"]])
			js = append(js, []byte(strings.Repeat(" ", max(0, room-len(js))))...)
			out[qt.stats["quant_state"]] = js
		} else {
			out[qt.stats["absmax"]] = safetensors.Float32AsBytes(nb.Absmax)
		}
	case qInt8:
		q, scb := make([]byte, len(x)), make([]float32, qt.shape[0])
		quant.Int8Quantize(q, scb, x, qt.shape[0], qt.shape[1])
		out[qt.weight], out[qt.stats["SCB"]] = q, safetensors.Float32AsBytes(scb)
	case qFP8Block:
		f := quant.FP8Block{Rows: qt.shape[0], Cols: qt.shape[1], BlockRows: qt.block[0], BlockCols: qt.block[1]}
		q, inv := make([]byte, len(x)), make([]float32, len(old.scales))
		f.Quantize(q, inv, x)
		out[qt.weight], out[qt.stats["scale"]] = q, safetensors.Float32AsBytes(inv)
	case qFP8Scaled:
		f := quant.FP8Scaled{Rows: qt.shape[0], Cols: qt.shape[1], PerChannel: len(old.scales) > 1}
		q, sc := make([]byte, len(x)), make([]float32, len(old.scales))
		f.Quantize(q, sc, x, nil)
		out[qt.weight], out[qt.stats["scale"]] = q, safetensors.Float32AsBytes(sc)
	case qMXFP4:
		blocks, scales := qt.mxfp4Quantize(x)
		out[qt.weight], out[qt.stats["scales"]] = blocks, scales
	}
	return out
}

// dequantizeBytesRange decodes elements [lo, lo+len(dst)) of a
// requantized result as the base's reader would; lo and len(dst) are
// whole rows of quantization blocks (surveyChunk).
func (qt *quantTensor) dequantizeBytesRange(dst []float32, enc map[string][]byte, old *quantized, lo int) {
	packed := enc[qt.weight]
	cols := qt.shape[len(qt.shape)-1]
	r0, rows := lo/cols, len(dst)/cols
	round := quant.RoundTo(qt.dtype.TorchName())
	switch qt.format {
	case qBnb4:
		b := *old.bnb
		if b.State.Nested() {
			b.AbsmaxCodes = enc[qt.stats["absmax"]]
			b.NestedAbsmax = safetensors.BytesAsFloat32(enc[qt.stats["nested_absmax"]])
			st, _ := quant.ParseBnb4State(enc[qt.stats["quant_state"]])
			b.State = st
		} else {
			b.Absmax = safetensors.BytesAsFloat32(enc[qt.stats["absmax"]])
		}
		b.DequantizeRange(dst, packed, b.BlockAbsmax(), lo, round)
		return
	case qInt8:
		quant.Int8Dequantize(dst, packed[lo:], safetensors.BytesAsFloat32(enc[qt.stats["SCB"]])[r0:], rows, cols)
	case qFP8Block:
		f := quant.FP8Block{Rows: rows, Cols: cols, BlockRows: qt.block[0], BlockCols: qt.block[1]}
		sc := (cols + qt.block[1] - 1) / qt.block[1]
		f.Dequantize(dst, packed[lo:], safetensors.BytesAsFloat32(enc[qt.stats["scale"]])[(r0/qt.block[0])*sc:])
	case qFP8Scaled:
		sc := safetensors.BytesAsFloat32(enc[qt.stats["scale"]])
		f := quant.FP8Scaled{Rows: rows, Cols: cols, PerChannel: len(sc) > 1}
		if f.PerChannel {
			sc = sc[r0:]
		}
		f.Dequantize(dst, packed[lo:], sc)
	case qMXFP4:
		qt.mxfp4Dequantize(dst, packed, enc[qt.stats["scales"]], lo)
	}
	if round != nil {
		for i, v := range dst {
			dst[i] = round(v)
		}
	}
}

// surveyChunk is the number of elements record decodes at a time: whole
// rows, a multiple of the quantization blocks' rows (FP8) and of the 4-bit
// blocks (an even count).
func (qt *quantTensor) surveyChunk() int {
	n := safetensors.Numel(qt.shape)
	cols := qt.shape[len(qt.shape)-1]
	unit := cols
	switch qt.format {
	case qFP8Block:
		unit = cols * qt.block[0]
	case qBnb4:
		unit = 2 * qt.bnb.Blocksize
	case qMXFP4:
		unit = n / qt.shape[0] // one expert
	}
	return min(n, max(unit, (1<<20)/unit*unit))
}

// fuseQuantOne handles the tensors of a quantized base: it reports done
// (with the error) for a quantized weight it wrote (or, with w nil,
// evaluated) and for a statistic its weight's worker writes; anything else
// goes the ordinary way.
func (q *quantPlan) fuseQuantOne(ctx context.Context, p *fusePlan, t *fuseTensor, base *modelfolder.Folder, w *safetensors.Writer) (bool, error) {
	if owner := q.ownerOf[t.src]; owner != nil {
		return q.keep && len(p.byName[owner.weight].ops) > 0, nil
	}
	qt := t.quant
	if qt == nil || (q.keep && len(t.ops) == 0) {
		return false, nil
	}
	// one quantized tensor at a time: each holds four copies of itself (the dequantized base, the sum, the written
	// values, the encoded bytes), and its own work runs on all cores (applyOps)
	q.heavy.Lock()
	defer q.heavy.Unlock()
	old, err := qt.read(base)
	if err != nil {
		return true, err
	}
	n := safetensors.Numel(qt.shape)
	deq := make([]float32, n)
	qt.dequantize(deq, old)
	wBase := deq
	var w16 []float32
	if q.ref != nil && len(t.ops) > 0 {
		if w16, err = q.readReference(qt); err != nil {
			return true, err
		}
		if q.mergeW16 {
			wBase = w16
		}
	}
	x := append([]float32(nil), wBase...)
	if err := applyOps(ctx, p, t, x); err != nil {
		return true, err
	}
	var enc map[string][]byte
	if q.keep {
		stored := map[string][]int{}
		for _, s := range qt.stats {
			if st := p.byName[s]; st != nil {
				stored[s] = st.storedShape()
			}
		}
		enc = qt.requantize(x, old, stored)
	}
	if len(t.ops) > 0 {
		written := func(dst []float32, lo int) { // the written values of [lo, lo+len(dst)), dequantized
			if enc != nil {
				qt.dequantizeBytesRange(dst, enc, old, lo)
				return
			}
			for i := range dst {
				dst[i] = safetensors.Round(t.dtype, x[lo+i])
			}
		}
		q.record(qt, wBase, x, written, deq, w16)
	}
	if w == nil {
		return true, nil
	}
	if !q.keep {
		return true, writeEncoded(w, t.name, t.dtype, x)
	}
	names := make([]string, 0, len(enc))
	for n := range enc {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if err := q.writers[n].WriteTensor(n, enc[n]); err != nil {
			return true, err
		}
	}
	for _, s := range qt.stats { // the statistics requantization keeps (quant_map, weight_format, ...): the base's bytes
		if _, ok := enc[s]; !ok {
			if _, err := base.CopyTensor(q.writers[s], s, s, nil); err != nil {
				return true, err
			}
		}
	}
	return true, nil
}

// readReference reads the 16-bit original of a quantized weight.
func (q *quantPlan) readReference(qt *quantTensor) ([]float32, error) {
	x, shape, err := q.ref.ReadFloat32(qt.weight)
	if err != nil {
		return nil, err
	}
	if safetensors.Numel(shape) != safetensors.Numel(qt.shape) {
		return nil, errs.Value("reference_base %s: tensor %s has shape %v, the quantized base's is %v", q.ref.Dir, qt.weight, shape, qt.shape)
	}
	return x, nil
}

// record computes one changed tensor's survival figures, decoding the
// written values a chunk at a time (written fills dst with the values of
// [lo, lo+len(dst))).
func (q *quantPlan) record(qt *quantTensor, w, sum []float32, written func(dst []float32, lo int), deq, w16 []float32) {
	var dot, dd, rr, gap float64
	chunk := qt.surveyChunk()
	buf := make([]float32, chunk)
	for lo := 0; lo < len(w); lo += chunk {
		out := buf[:min(chunk, len(w)-lo)]
		written(out, lo)
		for j, v := range out {
			i := lo + j
			d := float64(sum[i]) - float64(w[i])
			dot += (float64(v) - float64(w[i])) * d
			dd += d * d
			r := float64(v) - float64(sum[i])
			rr += r * r
			if w16 != nil {
				g := float64(deq[i]) - float64(w16[i])
				gap += g * g
			}
		}
	}
	rep := QuantTensorReport{Tensor: qt.weight, Format: q.method, Survival: 1} // no update at all: nothing to lose
	if dd > 0 {
		rep.Survival, rep.Residual = dot/dd, math.Sqrt(rr/dd)
	}
	if w16 != nil && dd > 0 {
		g := math.Sqrt(gap / dd)
		rep.ReferenceGap = &g
	}
	q.mu.Lock()
	q.reports = append(q.reports, rep)
	q.mu.Unlock()
}

// evaluate computes the survival of every changed quantized tensor
// without writing (a dry run).
func (q *quantPlan) evaluate(ctx context.Context, p *fusePlan, base *modelfolder.Folder, workers int) error {
	var todo []*fuseTensor
	for _, t := range p.tensors {
		if t.quant != nil && len(t.ops) > 0 {
			todo = append(todo, t)
		}
	}
	if workers <= 0 {
		workers = 2
	}
	return parallel.RunJobs(ctx, len(todo), min(workers, 2), nil, func(_, i int) error {
		_, err := q.fuseQuantOne(ctx, p, todo[i], base, nil)
		return err
	})
}

// finish puts the survival report and its warnings into the result.
func (q *quantPlan) finish(opts *Options, res *Result) {
	sort.Slice(q.reports, func(i, j int) bool { return q.reports[i].Tensor < q.reports[j].Tensor })
	out := "keep_format"
	if !q.keep {
		d, _ := safetensors.ParseDType(opts.DType)
		out = d.TorchName()
	}
	mb := "dequant"
	if q.mergeW16 {
		mb = "w16"
	}
	res.Quantized = &QuantReport{Method: q.method, Output: out, MergeBase: mb, Threshold: q.threshold, Tensors: append([]QuantTensorReport{}, q.reports...)}
	for _, r := range q.reports {
		// below the threshold, or as far above 1 (the requantization noise along the update outweighs it)
		if q.threshold > 0 && (r.Survival < q.threshold || r.Survival > 2-q.threshold) { // 0 turns the warning off
			res.Warnings = append(res.Warnings, fmt.Sprintf("%s: only %.3g of the update survives (residual %.3g of the update's norm; threshold %g): the update is below the %s quantization step",
				r.Tensor, r.Survival, r.Residual, q.threshold, q.method))
		}
	}
}

// close releases the reference base.
func (q *quantPlan) close() {
	if q != nil && q.ref != nil {
		q.ref.Close()
	}
}

// storedShape is the tensor's shape in the output file (a quantized
// weight's packed shape, a reserved quant_state), else its shape.
func (t *fuseTensor) storedShape() []int {
	if t.stored != nil {
		return t.stored
	}
	return t.shape
}

// quantCardSection adds the survival report of a quantized base to a
// model card.
func quantCardSection(c *card.Card, res *Result) {
	r := res.Quantized
	if r == nil {
		return
	}
	s := c.Section("Quantized base")
	how := "requantized to the base's own format (`keep_format`); untouched tensors are the base's bytes"
	if r.Output != "keep_format" {
		how = "written dequantized in " + r.Output
	}
	s.Printf("The base is quantized (%s). The update was added in float64 to the %s weights, rounded once, and %s.\n\n",
		r.Method, map[string]string{"dequant": "dequantized", "w16": "16-bit original (reference base)"}[r.MergeBase], how)
	s.Text("Survival: the fraction of each tensor's update that the written weights keep, " +
		"<Q - W, dW> / ||dW||² (1: all of it, 0: none); residual: ||Q - (W + dW)|| / ||dW||.\n\n")
	ref := false
	for _, t := range r.Tensors {
		ref = ref || t.ReferenceGap != nil
	}
	cols := []string{"tensor", "survival", "residual"}
	if ref {
		cols = append(cols, "||deq(Wq) - W16|| / ||dW||")
	}
	s.Table(cols...)
	for _, t := range r.Tensors {
		row := []string{card.Code(t.Tensor), fmt.Sprintf("%.4g", t.Survival), fmt.Sprintf("%.4g", t.Residual)}
		if ref {
			g := "-"
			if t.ReferenceGap != nil {
				g = fmt.Sprintf("%.4g", *t.ReferenceGap)
			}
			row = append(row, g)
		}
		s.Row(row...)
	}
}
