package quant

import (
	"gomerge/gomerge/errs"
	"gomerge/gomerge/safetensors"
)

// CodecRequest runs one codec on the tensors of a safetensors file and
// writes its results to another: the codecs' own entry point, which the
// tests use to compare them with the reference libraries.
//
// Input and output tensors by format (op "dequantize": the stored tensors
// in, "out" F32 out; op "quantize": "w" F32 in, the stored tensors out):
//
//   - bnb4: weight (U8 or another quant_storage), absmax, quant_map,
//     quant_state (U8 JSON), with double quant nested_absmax and
//     nested_quant_map; quantize takes quant_map, quant_state,
//     nested_quant_map as templates and "offset" (F32 [1], the
//     reference's mean) when given
//   - int8: weight (I8), SCB
//   - fp8_block: weight (F8_E4M3), weight_scale_inv; Block is its size
//   - fp8_scaled: weight (F8_E4M3), weight_scale ([1] or [rows, 1])
//   - bnb8 (quantize only): w and code (F32 [256]) to codes and absmax,
//     in blocks of Block[0] (default 256)
//   - mxfp4: blocks (U8 [..., G, 16]), scales (U8 [..., G]); out is
//     [..., G * 32], in the stored order
type CodecRequest struct {
	Format     string `json:"format"`
	Op         string `json:"op"`
	Input      string `json:"input"`
	Output     string `json:"output"`
	Block      []int  `json:"block"`       // fp8_block: [rows, cols] (default 128 x 128)
	PerChannel bool   `json:"per_channel"` // fp8_scaled quantize
}

// RunCodec runs a CodecRequest.
func RunCodec(req CodecRequest) error {
	in, err := safetensors.Open(req.Input)
	if err != nil {
		return err
	}
	defer in.Close()
	raw := func(name string) ([]byte, error) { return in.ReadRaw(name, nil) }
	f32 := func(name string) ([]float32, error) {
		e, ok := in.Entries[name]
		if !ok {
			return nil, errs.Value("%s: no tensor %s", req.Input, name)
		}
		if e.DType == "" {
			return nil, errs.Value("%s: tensor %s has dtype %s, not a float", req.Input, name, e.RawDType)
		}
		return in.ReadFloat32(name)
	}
	in.AllowNonFinite = true
	out := map[string]safetensors.RawTensor{}
	rawNames := map[string]string{}
	put := func(name, dtype string, shape []int, data []byte) {
		out[name] = safetensors.RawTensor{Shape: shape, Data: data, DType: safetensors.F32}
		if dtype != "F32" {
			out[name] = safetensors.RawTensor{Shape: shape, Data: data}
			rawNames[name] = dtype
		}
	}
	shapeOf := func(name string) []int { return in.Entries[name].Shape }
	var w []float32
	if req.Op == "quantize" {
		if w, err = f32("w"); err != nil {
			return err
		}
	} else if req.Op != "dequantize" {
		return errs.Value("op: %q is not dequantize or quantize", req.Op)
	}
	switch req.Format {
	case "bnb4":
		b, err := readBnb4(raw, f32, req.Op == "quantize")
		if err != nil {
			return errs.Value("%s: %v", req.Input, err)
		}
		if req.Op == "dequantize" {
			packed, err := raw("weight")
			if err != nil {
				return err
			}
			if err := b.Check(len(packed)); err != nil {
				return errs.Value("%s: %v", req.Input, err)
			}
			x := make([]float32, b.State.Numel())
			b.Dequantize(x, packed, RoundTo(b.State.DType))
			put("out", "F32", b.State.Shape, safetensors.Float32AsBytes(x))
			break
		}
		if len(w) != b.State.Numel() {
			return errs.Value("%s: w has %d values, quant_state's shape %v", req.Input, len(w), b.State.Shape)
		}
		packed := make([]byte, b.State.PackedBytes())
		var q *Bnb4
		if off, err := f32("offset"); err == nil && b.State.Nested() {
			q = b.RequantizeWithOffset(packed, w, off[0])
		} else {
			q = b.Requantize(packed, w)
		}
		put("weight", "U8", []int{len(packed), 1}, packed)
		if q.State.Nested() {
			put("absmax", "U8", []int{len(q.AbsmaxCodes)}, q.AbsmaxCodes)
			put("nested_absmax", "F32", []int{len(q.NestedAbsmax)}, safetensors.Float32AsBytes(q.NestedAbsmax))
			put("nested_quant_map", "F32", []int{256}, safetensors.Float32AsBytes(q.NestedQuantMap))
		} else {
			put("absmax", "F32", []int{len(q.Absmax)}, safetensors.Float32AsBytes(q.Absmax))
		}
		js := q.State.JSON()
		put("quant_state", "U8", []int{len(js)}, js)
	case "bnb8":
		if req.Op != "quantize" {
			return errs.Value("format bnb8: only quantize (the nested absmax codes) is offered")
		}
		code, err := f32("code")
		if err != nil {
			return err
		}
		if len(code) != 256 {
			return errs.Value("%s: code has %d values, not 256", req.Input, len(code))
		}
		bs := 256
		if len(req.Block) == 1 {
			bs = req.Block[0]
		}
		codes, absmax := make([]byte, len(w)), make([]float32, ceilDiv(len(w), bs))
		QuantizeBlockwise8(codes, absmax, w, code, bs)
		put("codes", "U8", []int{len(codes)}, codes)
		put("absmax", "F32", []int{len(absmax)}, safetensors.Float32AsBytes(absmax))
	case "int8":
		if req.Op == "dequantize" {
			q, err := raw("weight")
			if err != nil {
				return err
			}
			scb, err := f32("SCB")
			if err != nil {
				return err
			}
			s := shapeOf("weight")
			x := make([]float32, len(q))
			Int8Dequantize(x, q, scb, s[0], len(q)/s[0])
			put("out", "F32", s, safetensors.Float32AsBytes(x))
			break
		}
		s := shapeOf("w")
		q, scb := make([]byte, len(w)), make([]float32, s[0])
		Int8Quantize(q, scb, w, s[0], len(w)/s[0])
		put("weight", "I8", s, q)
		put("SCB", "F32", []int{s[0]}, safetensors.Float32AsBytes(scb))
	case "fp8_block":
		bs := req.Block
		if len(bs) == 0 {
			bs = []int{128, 128}
		}
		name := "weight"
		if req.Op == "quantize" {
			name = "w"
		}
		s := shapeOf(name)
		if len(s) != 2 || len(bs) != 2 {
			return errs.Value("%s: fp8_block needs a 2-D %s and a 2-value block", req.Input, name)
		}
		f := FP8Block{Rows: s[0], Cols: s[1], BlockRows: bs[0], BlockCols: bs[1]}
		if req.Op == "dequantize" {
			q, err := raw("weight")
			if err != nil {
				return err
			}
			inv, err := f32("weight_scale_inv")
			if err != nil {
				return err
			}
			if err := f.Check(len(inv)); err != nil {
				return errs.Value("%s: %v", req.Input, err)
			}
			x := make([]float32, len(q))
			f.Dequantize(x, q, inv)
			put("out", "F32", s, safetensors.Float32AsBytes(x))
			break
		}
		q, inv := make([]byte, len(w)), make([]float32, f.ScaleShape()[0]*f.ScaleShape()[1])
		f.Quantize(q, inv, w)
		put("weight", "F8_E4M3", s, q)
		put("weight_scale_inv", "F32", f.ScaleShape(), safetensors.Float32AsBytes(inv))
	case "fp8_scaled":
		if req.Op == "dequantize" {
			q, err := raw("weight")
			if err != nil {
				return err
			}
			sc, err := f32("weight_scale")
			if err != nil {
				return err
			}
			s := shapeOf("weight")
			f := FP8Scaled{Rows: s[0], Cols: len(q) / s[0], PerChannel: len(sc) > 1}
			x := make([]float32, len(q))
			f.Dequantize(x, q, sc)
			put("out", "F32", s, safetensors.Float32AsBytes(x))
			break
		}
		s := shapeOf("w")
		f := FP8Scaled{Rows: s[0], Cols: len(w) / s[0], PerChannel: req.PerChannel}
		n, shape := 1, []int{1}
		if req.PerChannel {
			n, shape = s[0], []int{s[0], 1}
		}
		q, sc := make([]byte, len(w)), make([]float32, n)
		f.Quantize(q, sc, w, nil)
		put("weight", "F8_E4M3", s, q)
		put("weight_scale", "F32", shape, safetensors.Float32AsBytes(sc))
	case "mxfp4":
		if req.Op == "dequantize" {
			blocks, err := raw("blocks")
			if err != nil {
				return err
			}
			scales, err := raw("scales")
			if err != nil {
				return err
			}
			if len(blocks) != 16*len(scales) {
				return errs.Value("%s: blocks has %d bytes, scales %d groups (16 bytes each)", req.Input, len(blocks), len(scales))
			}
			x := make([]float32, 2*len(blocks))
			MXFP4Dequantize(x, blocks, scales)
			s := append([]int(nil), shapeOf("scales")...)
			s[len(s)-1] *= 32
			put("out", "F32", s, safetensors.Float32AsBytes(x))
			break
		}
		s := shapeOf("w")
		if s[len(s)-1]%32 != 0 {
			return errs.Value("%s: w's last dimension %d is not a multiple of 32", req.Input, s[len(s)-1])
		}
		g := len(w) / 32
		blocks, scales := make([]byte, 16*g), make([]byte, g)
		MXFP4Quantize(blocks, scales, w)
		ss := append(append([]int(nil), s[:len(s)-1]...), s[len(s)-1]/32)
		put("blocks", "U8", append(append([]int(nil), ss...), 16), blocks)
		put("scales", "U8", ss, scales)
	default:
		return errs.Value("format: %q is not bnb4, int8, fp8_block, fp8_scaled or mxfp4", req.Format)
	}
	return writeRaw(req.Output, out, rawNames)
}

// writeRaw writes tensors (F32, or the raw dtypes named in raws) to path.
func writeRaw(path string, tensors map[string]safetensors.RawTensor, raws map[string]string) error {
	var outs []safetensors.OutTensor
	for n, t := range tensors {
		outs = append(outs, safetensors.OutTensor{Name: n, DType: t.DType, Shape: t.Shape, RawDType: raws[n]})
	}
	w, err := safetensors.Create(path, outs, map[string]string{"format": "pt"})
	if err != nil {
		return err
	}
	for n, t := range tensors {
		if err := w.WriteTensor(n, t.Data); err != nil {
			w.Close()
			return err
		}
	}
	return w.Close()
}

// readBnb4 reads a bitsandbytes 4-bit tensor's statistics from tensors
// named without the module prefix (absmax, quant_map, ...); for a quantize
// the state's templates only.
func readBnb4(raw func(string) ([]byte, error), f32 func(string) ([]float32, error), templates bool) (*Bnb4, error) {
	js, err := raw("quant_state")
	if err != nil {
		return nil, err
	}
	st, err := ParseBnb4State(js)
	if err != nil {
		return nil, err
	}
	b := &Bnb4{State: st}
	if b.QuantMap, err = f32("quant_map"); err != nil {
		return nil, err
	}
	if st.Nested() {
		if b.NestedQuantMap, err = f32("nested_quant_map"); err != nil {
			return nil, err
		}
	}
	if templates {
		return b, nil
	}
	if !st.Nested() {
		b.Absmax, err = f32("absmax")
		return b, err
	}
	if b.AbsmaxCodes, err = raw("absmax"); err != nil {
		return nil, err
	}
	if b.NestedAbsmax, err = f32("nested_absmax"); err != nil {
		return nil, err
	}
	return b, nil
}

// RoundTo returns the rounding of float32 values to a torch dtype
// (bfloat16, float16), nil for float32.
func RoundTo(torchDType string) func(float32) float32 {
	d, err := safetensors.ParseDType(torchDType)
	if err != nil || d == safetensors.F32 {
		return nil
	}
	return func(x float32) float32 { return safetensors.Round(d, x) }
}
